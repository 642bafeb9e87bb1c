"""The advantages StepGRPO trains on: the step's rewards (the weighted total of --reward_funcs,
r1vl.rewards.functions) normalized within each group of G completions.

A reward may be NaN: every function returned None ("no opinion") for that completion. As in
TRL's GRPOTrainer, such a completion is left out of its group's mean and standard deviation
(and of the batch's with --scale_rewards batch) and its advantage is 0: it carries no signal.
Without a NaN the computation is the fused kernel's (r1vl_kernels.group_advantages), as before.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from r1vl_kernels import group_advantages


def step_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str,
                    sum_over_ranks: Callable[[list[float]], list[float]], eps: float = 1e-4) -> torch.Tensor:
    """(S,) fp32 advantages of this rank's rewards (S,), groups of G consecutive completions.

    "group" and "none" need only the rank's own groups. "batch" divides by the unbiased std
    of the whole step's rewards, every rank's (as TRL does after gathering them), not this
    rank's alone: sum_over_ranks (r1vl.distributed.all_reduce_sum) sums [count, sum, sum of
    squares]. Every rank must call this, also one whose prompts were all skipped (S = 0).
    """
    unscorable = torch.isnan(rewards)
    if scale_rewards != "batch":
        if not rewards.numel():
            return torch.zeros(0)
        if unscorable.any():
            return _nan_group_advantages(rewards, group_size, scale_rewards, eps)
        return group_advantages(rewards, group_size, scale_rewards, eps=eps, impl="torch")
    r = rewards.double()[~unscorable]  # the whole tensor when none is NaN
    count, total, squares = sum_over_ranks([r.numel(), float(r.sum()), float((r * r).sum())])
    mean = total / max(count, 1)
    std = math.sqrt(max(squares - count * mean * mean, 0.0) / (count - 1)) if count > 1 else 0.0
    if not rewards.numel():
        return torch.zeros(0)
    if unscorable.any():
        return _nan_group_advantages(rewards, group_size, "none", eps).div(std + eps).float()
    centered = group_advantages(rewards, group_size, "none", impl="torch")
    return (centered / (std + eps)).float()


def _nan_group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str, eps: float) -> torch.Tensor:
    """(S,) fp32: group_advantages with NaN rewards left out of the statistics (TRL's nanmean and
    Bessel-corrected nanstd; a group with one scorable completion has no std) and advantage 0."""
    grouped = rewards.float().view(-1, group_size)
    present = ~torch.isnan(grouped)
    count = present.sum(dim=1, keepdim=True)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    adv = grouped - mean
    if scale_rewards == "group":
        var = torch.where(present, adv * adv, 0.0).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
        std = torch.where(count > 1, var.sqrt(), torch.nan)
        adv = adv / (std + eps)
    return torch.nan_to_num(adv, nan=0.0).reshape(-1)
