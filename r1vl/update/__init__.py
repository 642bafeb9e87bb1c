"""Step 4, update: the batch planned and packed, the packed forward, the GRPO and SFT losses, the engines."""
