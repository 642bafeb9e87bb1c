"""One StepGRPO update from a scored rollout: what `train.py` does between sampling and logging.

    batch = Rollout(...)                                   # train.rollout: sampled, scored, packed
    update = grpo_update(engine, reference, batch, filler, cfg, impl, world)

Every micro-batch's loss is weighted by its share of the global batch (r1vl.losses.microbatch_weight)
and the engine sums gradients over ranks, so the step's gradient is that of the whole batch
of every rank's completions. The step is a function of its own so that a test can drive it
with fixed advantages on several ranks and compare the gradient with a single-process one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from r1vl import distributed
from r1vl.losses import completion_logprobs, microbatch_weight, policy_loss
from r1vl.metrics import Timer
from r1vl.packing import PackedBatch, Sample
from r1vl.prompts import Prompt

if TYPE_CHECKING:
    from r1vl.rewards import RewardBreakdown


@dataclass
class Rollout:
    """One rank's share of a GRPO step: P prompts, G completions each, prompt-major (p*G + g)."""

    prompts: list[Prompt]  # the P prompts kept (those over max_prompt_length are skipped)
    samples: list[Sample]  # P*G (prompt, completion) pairs, what the update packs
    stopped: torch.Tensor  # (P*G,) bool: the completion ended with EOS (False: cut at the length limit)
    rewards: RewardBreakdown  # P*G entries
    advantages: torch.Tensor  # (P*G,) fp32, normalized within each group (r1vl.losses.step_advantages)
    skipped: int  # prompts skipped for their length
    microbatches: list[tuple[list[int], PackedBatch]]  # (indices into samples, packed batch on the device)
    split_groups: int = 0  # prompt groups over micro_batch_tokens, packed in parts that each recompute the prompt
    decode_slots: int = 0  # rows the sampler ran, summed over positions (r1vl.rollout.Completions.decode_slots)

    @property
    def num_tokens(self) -> int:
        """Completion tokens of this rank: the loss's target count."""
        return sum(len(s.completion_ids) for s in self.samples)


class _Share(NamedTuple):
    """One micro-batch as the update runs it."""

    packed: PackedBatch
    advantages: torch.Tensor  # (S,) one per packed sequence
    weight: float  # its share of the global batch; 0 for a filler
    counted: bool  # False for a filler (engine.lockstep): its statistics are not the batch's


STAT_KEYS = ("loss", "kl", "entropy", "clip_low", "clip_high")


def grpo_update(engine, reference, batch: Rollout, filler: PackedBatch, cfg, impl: str, world: distributed.Dist,
                timer: Timer | None = None) -> dict:
    """Old and reference log-probs, then cfg.num_iterations optimizer steps over the rank's
    micro-batches. Every rank calls it, also one whose prompts were all skipped.

    cfg: temperature, beta, epsilon_low/high, loss_type, max_completion_length, num_iterations,
    loss_softmax.
    Returns this rank's token-weighted sums over the step ("loss", "kl", "entropy",
    "clip_low", "clip_high"; averaged over the iterations; loss already a share of the global
    batch), the global "sequences" and "tokens" counts, and the last "grad_norm".
    """
    timer = timer or Timer(world.device)
    sequences, tokens = distributed.all_reduce_sum([len(batch.samples), batch.num_tokens], world.device)
    work = engine.lockstep(batch.microbatches, filler)  # zero-weighted fillers where ranks must keep pace
    shares = [
        _Share(packed, torch.zeros(packed.num_sequences), 0.0, False) if idx is None else
        _Share(packed, batch.advantages[idx],
               microbatch_weight(cfg.loss_type, len(idx), packed.target_ids.numel(), sequences, tokens), True)
        for idx, packed in work]

    with timer("reference"):  # once per rollout
        old = [engine.forward(completion_logprobs, s.packed, cfg.temperature, impl) if cfg.num_iterations > 1
               else None for s in shares]
        ref = [reference.forward(completion_logprobs, s.packed, cfg.temperature, impl) if reference is not None
               else None for s in shares]

    loss_options = dict(temperature=cfg.temperature, beta=cfg.beta, epsilon_low=cfg.epsilon_low,
                        epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                        max_completion_length=cfg.max_completion_length, num_items_in_batch=tokens,
                        softmax=cfg.loss_softmax)
    # Token-weighted sums, kept on the device and read back once per optimizer step.
    stats = {k: torch.zeros((), device=world.device) for k in STAT_KEYS}
    with timer("update"):
        engine.train()
        for _ in range(cfg.num_iterations):
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
    return {**{k: float(v) / cfg.num_iterations for k, v in stats.items()},
            "sequences": sequences, "tokens": tokens, "grad_norm": grad_norm}
