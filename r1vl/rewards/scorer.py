"""Stage 2 of a StepGRPO step: score every sampled completion, then the advantages.

    scorer = Scorer(cfg.reward, cfg.sampling.num_generations, world, num_steps=cfg.objective.num_steps)
    rewards = scorer.score_step(rollout, step)   # StepRewards: each function's, the weighted total
    advantages = scorer.advantages(rewards)      # (P*G,) fp32, normalized within each group

The paper's breakdown (StepRAR + StepRVR, the accuracy, ...) is always scored and logged
(`score`, also what the held-out evaluation reports); --reward_funcs and --reward_weights choose
what the advantages are computed from (r1vl.rewards.functions). The user's functions run in a
worker process with a deadline (r1vl.rewards.worker), on this rank's own completions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from r1vl import distributed
from r1vl.config import RewardOptions
from r1vl.rewards import RewardBreakdown, RewardConfig, score_groups
from r1vl.rewards.advantages import step_advantages
from r1vl.rewards.functions import builtin_column, parse_reward_funcs, weighted_total
from r1vl.rewards.inputs import reward_inputs
from r1vl.rewards.worker import RewardFunctionError, reward_worker


@dataclass(frozen=True)
class StepRewards:
    """One step's rewards on this rank, N = P*G completions, prompt-major."""

    breakdown: RewardBreakdown  # the paper's components, (N,) each
    names: tuple[str, ...]  # F reward functions, as logged (rewards/<name>)
    per_function: torch.Tensor  # (N, F) fp32, NaN where a function returned None
    total: torch.Tensor  # (N,) fp32, the weighted nansum; NaN where every function returned None


class Scorer:
    """options: the run's reward options; group_size: G, the completions of one prompt the
    advantages are normalized over; num_steps: the GRPO steps of the run (a user's function sees
    them as trainer_state.max_steps). world: "batch" normalization sums over its ranks."""

    def __init__(self, options: RewardOptions, group_size: int, world: distributed.Dist, *, num_steps: int = 0):
        self.options, self.group_size, self.world, self.num_steps = options, group_size, world, num_steps
        self.reward_config = RewardConfig(alpha=options.reward_alpha, normalize=options.reward_normalize,
                                          symbolic=options.reward_symbolic)
        self.specs = parse_reward_funcs(options.reward_funcs, options.reward_weights)
        self.weights = torch.tensor([s.weight for s in self.specs], dtype=torch.float32)
        users = any(not s.builtin for s in self.specs)
        self.worker = reward_worker(self.specs, options.reward_timeout_s) if users else None

    def score(self, rollout) -> RewardBreakdown:
        """rollout: r1vl.sampling.sampler.Rollout. Entry p*G + g: completion g of prompt p."""
        return score_groups(rollout.groups(), [p.example for p in rollout.prompts], self.reward_config)

    def score_step(self, rollout, step: int) -> StepRewards:
        """Every --reward_funcs function on this rank's completions of GRPO step `step`.
        Raises r1vl.rewards.worker.RewardFunctionError when a user's function fails."""
        breakdown = self.score(rollout)
        n, G = len(breakdown), rollout.group_size
        kwargs, sources = reward_inputs(rollout, step, self.num_steps) if self.worker and n else ({}, [])
        columns, failure = [], None
        for spec in self.specs:
            if spec.builtin:
                columns.append(torch.from_numpy(builtin_column(breakdown, spec.name)))
            elif not n or failure is not None:
                columns.append(torch.full((n,), float("nan")))
            else:
                try:
                    values = self.worker.call(spec, kwargs, G, sources)
                except RewardFunctionError as e:
                    failure, values = e, [None] * n
                columns.append(torch.tensor([float("nan") if v is None else v for v in values], dtype=torch.float32))
        if self.worker is not None:
            # Every rank learns here whether any rank's functions failed, so that all stop
            # together, each with an error line, instead of the others dying in the next collective.
            failed_somewhere = distributed.all_reduce_max([float(failure is not None)], self.world.device)[0]
            if failure is not None:
                raise failure
            if failed_somewhere:
                raise RewardFunctionError("a reward function failed on another rank (its error line says which); "
                                          "this rank stops with it")
        per_function = torch.stack(columns, dim=1)
        return StepRewards(breakdown, tuple(s.name for s in self.specs), per_function,
                           weighted_total(per_function, self.weights))

    def advantages(self, rewards: StepRewards) -> torch.Tensor:
        """(P*G,) fp32: the weighted total normalized within each group. Every rank calls it
        (with --scale_rewards batch the statistics are the whole step's)."""
        device = self.world.device
        return step_advantages(rewards.total, self.group_size, self.options.scale_rewards,
                               lambda values: distributed.all_reduce_sum(values, device))
