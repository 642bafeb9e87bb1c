"""The held-out evaluation a run makes before StepGRPO, every --eval_every steps and at the
end: mean reward and accuracy of sampled completions on prompts never trained on.

The full reward (StepRAR + StepRVR), whatever --reward_funcs trains on. The same seed each time:
successive evaluations draw the same random numbers, so their differences are the policy's,
less sampling noise.
"""
from __future__ import annotations

import torch

from r1vl import distributed
from r1vl.config import EvalOptions
from r1vl.rewards.scorer import Scorer
from r1vl.run.metrics import reduce_over_ranks
from r1vl.sampling.sampler import Sampler


class HeldOut:
    """examples: the held-out examples (split over ranks); options: eval_generations (0: the
    sampler's G); batch_size: completions sampled at a time (--batch_size); seed: the run's."""

    def __init__(self, sampler: Sampler, scorer: Scorer, examples: list, options: EvalOptions, world: distributed.Dist,
                 *, batch_size: int, seed: int):
        self.sampler, self.scorer, self.examples, self.world = sampler, scorer, examples, world
        self.generations = options.eval_generations or sampler.group_size
        self.per_chunk = max(batch_size // self.generations, 1)
        self.seed = seed + 7

    def __call__(self, seed: int | None = None) -> dict:
        """{"reward", "accuracy", "step_rvr"}: means over every rank's completions ({} without
        examples). seed: of the draws (default the run's seed + 7, the same every time)."""
        if not self.examples:
            return {}
        world = self.world
        generator = torch.Generator(world.device).manual_seed((self.seed if seed is None else seed) + world.rank)
        sampler = self.sampler.with_settings(generator, self.generations)
        sums = {"reward": 0.0, "accuracy": 0.0, "step_rvr": 0.0, "completions": 0}
        mine = self.examples[world.rank::world.world_size]
        for start in range(0, len(mine), self.per_chunk):
            r = self.scorer.score(sampler.sample(mine[start:start + self.per_chunk]))
            for key, value in (("reward", r.total.sum()), ("accuracy", r.accuracy.sum()),
                               ("step_rvr", r.step_rvr.sum()), ("completions", len(r))):
                sums[key] += value
        total = reduce_over_ranks(sums, world.device)
        n = max(total.pop("completions"), 1)
        return {k: v / n for k, v in total.items()}
