"""The policy model: the families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), loading and saving, and the packed attention it runs."""
