"""Stage 2 of a StepGRPO step: score every sampled completion, then the advantages.

    scorer = Scorer(cfg.reward, cfg.sampling.num_generations, world)
    rewards = scorer.score(samples)           # RewardBreakdown, one entry per completion
    advantages = scorer.advantages(rewards)   # (P*G,) fp32, normalized within each group

The full reward (StepRAR + StepRVR) is always scored and logged; `--rewards` chooses what the
advantages are computed from (r1vl.rewards.advantages).
"""
from __future__ import annotations

import torch

from r1vl import distributed
from r1vl.config import RewardOptions
from r1vl.rewards import RewardBreakdown, RewardConfig, score_groups
from r1vl.rewards.advantages import step_advantages, trained_reward


class Scorer:
    """options: the run's reward options; group_size: G, the completions of one prompt the
    advantages are normalized over. world: "batch" normalization sums over its ranks."""

    def __init__(self, options: RewardOptions, group_size: int, world: distributed.Dist):
        self.options, self.group_size, self.world = options, group_size, world
        self.reward_config = RewardConfig(alpha=options.reward_alpha, normalize=options.reward_normalize,
                                          symbolic=options.reward_symbolic)

    def score(self, samples) -> RewardBreakdown:
        """samples: r1vl.sampling.sampler.Samples. Entry p*G + g: completion g of prompt p."""
        return score_groups(samples.groups(), [p.example for p in samples.prompts], self.reward_config)

    def advantages(self, rewards: RewardBreakdown) -> torch.Tensor:
        """(P*G,) fp32: the trained reward normalized within each group. Every rank calls it
        (with --scale_rewards batch the statistics are the whole step's)."""
        trained = torch.as_tensor(trained_reward(rewards, self.options.rewards), dtype=torch.float32)
        device = self.world.device
        return step_advantages(trained, self.group_size, self.options.scale_rewards,
                               lambda values: distributed.all_reduce_sum(values, device))
