"""The advantages StepGRPO trains on: which reward components are summed (`--rewards`, the
paper's ablation), then normalized within each group of G completions.

    accuracy  the outcome reward: 1 for a correct final answer, else 0
    steprar   StepRAR: the accuracy plus alpha times the key-step match (when an answer is given)
    steprvr   the accuracy plus StepRVR (1 for a complete, logically ordered solution)
    all       StepRAR + StepRVR, the paper's StepGRPO reward (the default)

The components are r1vl.rewards' own, unchanged. Logged metrics and held-out evaluations
always report the full reward (`total`) too, so runs with different choices stay comparable.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from r1vl.config import REWARD_SETS  # noqa: F401  (the choices of --rewards, kept with the options)
from r1vl_kernels import group_advantages

if TYPE_CHECKING:
    from r1vl.rewards import RewardBreakdown


def trained_reward(breakdown: RewardBreakdown, rewards: str) -> np.ndarray:
    """(N,) float32: the reward the advantages use under `--rewards` (one of REWARD_SETS)."""
    if rewards == "all":
        return breakdown.total
    if rewards == "accuracy":
        return breakdown.accuracy
    if rewards == "steprar":
        return breakdown.step_rar
    if rewards == "steprvr":
        return (breakdown.accuracy + breakdown.step_rvr).astype(np.float32)
    raise ValueError(f"rewards must be one of {REWARD_SETS}, got {rewards!r}")


def step_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str,
                    sum_over_ranks: Callable[[list[float]], list[float]], eps: float = 1e-4) -> torch.Tensor:
    """(S,) fp32 advantages of this rank's rewards (S,), groups of G consecutive completions.

    "group" and "none" need only the rank's own groups. "batch" divides by the unbiased std
    of the whole step's rewards, every rank's (as TRL does after gathering them), not this
    rank's alone: sum_over_ranks (r1vl.distributed.all_reduce_sum) sums [count, sum, sum of
    squares]. Every rank must call this, also one whose prompts were all skipped (S = 0).
    """
    if scale_rewards != "batch":
        return group_advantages(rewards, group_size, scale_rewards, eps=eps, impl="torch") if rewards.numel() \
            else torch.zeros(0)
    r = rewards.double()
    count, total, squares = sum_over_ranks([r.numel(), float(r.sum()), float((r * r).sum())])
    mean = total / max(count, 1)
    std = math.sqrt(max(squares - count * mean * mean, 0.0) / (count - 1)) if count > 1 else 0.0
    if not rewards.numel():
        return torch.zeros(0)
    centered = group_advantages(rewards, group_size, "none", impl="torch")
    return (centered / (std + eps)).float()
