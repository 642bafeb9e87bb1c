"""The policy model: loading and saving Qwen2-VL / Qwen2.5-VL, and the packed attention it runs."""
