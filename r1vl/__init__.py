"""r1vl: StepGRPO (R1-VL) for Qwen2-VL; `train.py` at the repository root is the trainer.

Library modules, bottom up: config (options), data, prompts, rewards/, rollout (the
sampler), packing, attention and model (the packed forward), losses, grpo (one update),
engine / deepspeed_engine / deepspeed_config (losses to updates), distributed, policy
(load / save a Hugging Face policy), checkpoints (trainer checkpoints and resume), metrics,
files (write-then-rename), tiny (the built-in demo's model).

Modules that are also command-line tools (`python -m r1vl.NAME --help`): keysteps (fill a
data file's key steps), synthetic (write the synthetic task), plot (draw a run's curves).
"""
