"""What the distributed workers (grpo_worker.py, deepspeed_worker.py) save to compare engines."""
from __future__ import annotations

import torch

from r1vl import distributed


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's whole state dict, ZeRO-3's shards gathered first, on every rank."""
    with distributed.gathered(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
