"""The three places the trainer turns a packed batch into numbers: log-probs, the GRPO loss,
the SFT loss. Only the N completion rows' hidden states go through the lm_head.

Log-probs and the GRPO loss use r1vl_kernels' hidden-state variants with the lm_head fused
in: the (N, V) logits are never materialized. The SFT warm-up's cross-entropy still
projects its rows through the lm_head.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from r1vl.model import completion_hidden
from r1vl.packing import PackedBatch
from r1vl_kernels import GRPOLossOutput, group_advantages, grpo_loss_from_hidden, token_logprobs_from_hidden


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


def kernel_impl(option: str, device: torch.device) -> str:
    """r1vl_kernels' impl for `device`: never None, which would read TRITON_INTERPRET and
    pick the (slow) interpreted Triton kernels on a CPU."""
    if option != "auto":
        return option
    return "triton" if device.type == "cuda" else "torch"


def _completion_logits(model: torch.nn.Module, packed: PackedBatch) -> torch.Tensor:
    """(N, V) logits in the model's dtype at the rows that predict completion tokens."""
    return model.lm_head(completion_hidden(model, packed))


def _lm_head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The lm_head's weight (V, H) and bias (V,) or None, as plain tensors."""
    return model.lm_head.weight, getattr(model.lm_head, "bias", None)


@torch.no_grad()
def completion_logprobs(model: torch.nn.Module, packed: PackedBatch, temperature: float, impl: str) -> torch.Tensor:
    """(N,) fp32 log softmax(logits / T)[target] of the completion tokens, without gradient:
    the old policy's (num_iterations > 1) and the reference's (beta > 0) log-probs."""
    weight, bias = _lm_head(model)
    return token_logprobs_from_hidden(completion_hidden(model, packed), weight, packed.target_ids, bias=bias,
                                      temperature=temperature, impl=impl)


def policy_loss(model: torch.nn.Module, packed: PackedBatch, advantages: torch.Tensor,
                old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None, *, impl: str,
                **loss_options) -> GRPOLossOutput:
    """The fused GRPO loss of one packed micro-batch (differentiable w.r.t. the model).

    advantages (S,) fp32, one per packed sequence; old_logp / ref_logp (N,) fp32 or None.
    loss_options: grpo_loss's keywords (temperature, beta, epsilon_low/high, loss_type,
    max_completion_length, num_items_in_batch, ...). Entropy is always returned.
    """
    weight, bias = _lm_head(model)
    return grpo_loss_from_hidden(completion_hidden(model, packed), weight, packed.target_ids,
                                 packed.completion_cu_seqlens, advantages, old_logp, ref_logp, bias=bias,
                                 return_entropy=True, impl=impl, **loss_options)


def sft_loss_sum(model: torch.nn.Module, packed: PackedBatch) -> torch.Tensor:
    """() fp32: the summed cross-entropy of the completion (assistant) tokens only; divide by
    the global token count for the mean."""
    return F.cross_entropy(_completion_logits(model, packed).float(), packed.target_ids, reduction="sum")


def microbatch_weight(loss_type: str, sequences: int, tokens: int, global_sequences: int,
                      global_tokens: int) -> float:
    """The factor on a micro-batch's loss that makes the sum over micro-batches and ranks the
    loss of the whole batch (so that summed gradients are the full-batch gradient).

    grpo and dr_grpo average over sequences: a micro-batch of s sequences carries s/S of the
    batch. bnpo averages over tokens: n/N. dapo already divides by num_items_in_batch, given
    the global token count.
    """
    if loss_type in ("grpo", "dr_grpo"):
        return sequences / global_sequences
    if loss_type == "bnpo":
        return tokens / global_tokens
    if loss_type == "dapo":
        return 1.0
    raise ValueError(f"unknown loss_type {loss_type!r}")
