"""Stage 4 of a StepGRPO step, the update: pack the rank's rollout, then old and reference
log-probs and num_iterations optimizer steps.

    update = GRPOUpdate(policy, cfg.objective, cfg.sampling, cfg.optimizer, cfg.memory, world, idle)  # its engine
    batch, numbers = update(rollout, advantages)            # plans and packs its own batch

Every micro-batch's loss is weighted by its share of the global batch
(r1vl.update.losses.microbatch_weight) and the engine sums gradients over ranks, so the step's
gradient is that of the whole batch of every rank's completions. `grpo_update` is the step on
an already packed batch, so that a test can drive it with fixed advantages on several ranks
and compare the gradient with a single-process one.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from r1vl import distributed
from r1vl.config import MemoryOptions, ObjectiveOptions, OptimizerOptions, SamplingOptions
from r1vl.model.policy import Policy
from r1vl.run.metrics import Timer
from r1vl.update.choose_engine import make_engine
from r1vl.update.losses import completion_logprobs, kernel_impl, microbatch_weight, policy_loss
from r1vl.update.microbatches import Batch, plan_batch
from r1vl.update.packing import PackedBatch, Sequence


class GRPOUpdate:
    """The update stage of StepGRPO: the engine (and its optimizer), the KL reference, the
    fused loss's implementation.

    objective: num_steps, num_iterations and the loss options of `grpo_update`; sampling: the
    temperature and max_completion_length the loss shares with the rollout; optimizer: the
    engine's (lr is the GRPO stage's rate); memory: micro_batch_tokens, share_prompts,
    kernel_impl. idle: what a rank with fewer micro-batches runs, weighted 0, under an engine
    that keeps ranks in lockstep. reference: set by the caller (None: beta = 0).
    """

    def __init__(self, policy: Policy, objective: ObjectiveOptions, sampling: SamplingOptions,
                 optimizer: OptimizerOptions, memory: MemoryOptions, world: distributed.Dist, idle: Sequence,
                 timer: Timer | None = None):
        self.model, self.world = policy.model, world
        self.objective, self.sampling, self.memory = objective, sampling, memory
        self.engine = make_engine(policy.model, optimizer, optimizer.lr, objective.num_steps * objective.num_iterations,
                                  world, idle)
        self.impl = kernel_impl(memory.kernel_impl, world.device)
        self.timer = timer or Timer(world.device)
        self.reference = None

    def __call__(self, rollout, advantages: torch.Tensor) -> tuple[Batch, dict]:
        """rollout: r1vl.sampling.sampler.Rollout, the rank's; advantages: (P*G,) one per
        completion. Returns the packed batch and `grpo_update`'s numbers."""
        sequences = [Sequence(rollout.prompt_of(i).ids, ids, rollout.prompt_of(i).pixel_values,
                              rollout.prompt_of(i).image_grid_thw) for i, ids in enumerate(rollout.completions.ids)]
        with self.timer("pack"):
            batch = plan_batch(sequences, advantages, rollout.group_size, self.model, self.memory, self.world.device)
        return batch, grpo_update(self.engine, self.reference, batch, self.objective, self.sampling, self.impl,
                                  self.world, self.timer)

    def close(self) -> None:
        self.engine.close()
        if self.reference is not None:
            self.reference.close()


class _Share(NamedTuple):
    """One micro-batch as the update runs it."""

    packed: PackedBatch
    advantages: torch.Tensor  # (S,) one per packed sequence
    weight: float  # its share of the global batch; 0 for an idle batch
    counted: bool  # False for an idle batch (engine.lockstep): its statistics are not the batch's


STAT_KEYS = ("loss", "kl", "entropy", "clip_low", "clip_high")


def grpo_update(engine, reference, batch: Batch, objective: ObjectiveOptions, sampling: SamplingOptions, impl: str,
                world: distributed.Dist, timer: Timer | None = None) -> dict:
    """Old and reference log-probs, then objective.num_iterations optimizer steps over the
    rank's micro-batches. Every rank calls it, also one whose prompts were all skipped.

    objective: beta, epsilon_low/high, loss_type, num_iterations, loss_softmax; sampling:
    temperature (the loss's logit temperature), max_completion_length (dr_grpo's divisor).
    Returns this rank's token-weighted sums over the step ("loss", "kl", "entropy",
    "clip_low", "clip_high"; averaged over the iterations; loss already a share of the global
    batch), the global "sequences" and "tokens" counts, and the last "grad_norm".
    """
    timer = timer or Timer(world.device)
    # Every rank's sequences and completion tokens: the denominators of the global batch.
    total_sequences, total_tokens = distributed.all_reduce_sum([len(batch.sequences), batch.completion_tokens],
                                                               world.device)
    work = engine.lockstep([(mb, mb.packed) for mb in batch.microbatches])  # idle batches where ranks keep pace
    shares = [
        _Share(packed, torch.zeros(packed.num_sequences), 0.0, False) if mb is None else
        _Share(packed, mb.advantages,
               microbatch_weight(objective.loss_type, len(mb.indices), packed.target_ids.numel(), total_sequences,
                                 total_tokens), True)
        for mb, packed in work]

    with timer("reference"):  # once per rollout
        old = [engine.forward(completion_logprobs, s.packed, sampling.temperature, impl) if objective.num_iterations > 1
               else None for s in shares]
        ref = [reference.forward(completion_logprobs, s.packed, sampling.temperature, impl) if reference is not None
               else None for s in shares]

    loss_options = dict(temperature=sampling.temperature, beta=objective.beta, epsilon_low=objective.epsilon_low,
                        epsilon_high=objective.epsilon_high, loss_type=objective.loss_type,
                        max_completion_length=sampling.max_completion_length, num_items_in_batch=total_tokens,
                        softmax=objective.loss_softmax)
    # Token-weighted sums, kept on the device and read back once per optimizer step.
    stats = {k: torch.zeros((), device=world.device) for k in STAT_KEYS}
    with timer("update"):
        engine.train()
        for _ in range(objective.num_iterations):
            iteration_loss = torch.zeros((), device=world.device)
            for share, old_logp, ref_logp in zip(shares, old, ref):
                out = engine.forward(policy_loss, share.packed, share.advantages.to(world.device), old_logp, ref_logp,
                                     impl=impl, **loss_options)
                loss = out.loss * share.weight
                engine.backward(loss)
                if share.counted:
                    n = share.packed.target_ids.numel()
                    iteration_loss += loss.detach()
                    if out.kl is not None:
                        stats["kl"] += out.kl.sum()
                    stats["entropy"] += out.entropy.sum()
                    stats["clip_low"] += out.clip_low_frac * n
                    stats["clip_high"] += out.clip_high_frac * n
            stats["loss"] += iteration_loss
            grad_norm = engine.step(math.isfinite(float(iteration_loss)))
        engine.eval()
    return {**{k: float(v) / objective.num_iterations for k, v in stats.items()},
            "sequences": total_sequences, "tokens": total_tokens, "grad_norm": grad_norm}
