"""Stage 2 of a StepGRPO step: score every sampled completion, then the advantages.

    scorer = Scorer(cfg, world)
    rewards = scorer.score(rollout)           # RewardBreakdown, one entry per completion
    advantages = scorer.advantages(rewards)   # (P*G,) fp32, normalized within each group

The full reward (StepRAR + StepRVR) is always scored and logged; `--rewards` chooses what the
advantages are computed from (r1vl.rewards.advantages).
"""
from __future__ import annotations

import torch

from r1vl import distributed
from r1vl.rewards import RewardBreakdown, RewardConfig, score_groups
from r1vl.rewards.advantages import step_advantages, trained_reward


class Scorer:
    """cfg: reward_alpha, reward_normalize, reward_symbolic, rewards, num_generations,
    scale_rewards. world: "batch" normalization sums over its ranks."""

    def __init__(self, cfg, world: distributed.Dist):
        self.cfg, self.world = cfg, world
        self.reward_config = RewardConfig(alpha=cfg.reward_alpha, normalize=cfg.reward_normalize,
                                          symbolic=cfg.reward_symbolic)

    def score(self, rollout) -> RewardBreakdown:
        """rollout: r1vl.sampling.sampler.Rollout. Entry p*G + g: completion g of prompt p."""
        return score_groups(rollout.groups(), [p.example for p in rollout.prompts], self.reward_config)

    def advantages(self, rewards: RewardBreakdown) -> torch.Tensor:
        """(P*G,) fp32: the trained reward normalized within each group. Every rank calls it
        (with --scale_rewards batch the statistics are the whole step's)."""
        trained = torch.as_tensor(trained_reward(rewards, self.cfg.rewards), dtype=torch.float32)
        device = self.world.device
        return step_advantages(trained, self.cfg.num_generations, self.cfg.scale_rewards,
                               lambda values: distributed.all_reduce_sum(values, device))
