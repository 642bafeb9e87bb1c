"""Which of StepGRPO's reward components a run trains on (`--rewards`): the paper's ablation.

The components are r1vl.rewards' own, unchanged; this only chooses which ones are summed
into the reward the advantages are computed from:

    accuracy  the outcome reward: 1 for a correct final answer, else 0
    steprar   StepRAR: the accuracy plus alpha times the key-step match (when an answer is given)
    steprvr   the accuracy plus StepRVR (1 for a complete, logically ordered solution)
    all       StepRAR + StepRVR, the paper's StepGRPO reward (the default)

Logged metrics and held-out evaluations always report the full reward (`total`) too, so runs
with different choices stay comparable.
"""
from __future__ import annotations

import numpy as np

from r1vl.config import REWARD_SETS
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
