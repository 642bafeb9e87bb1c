"""The three places the trainer turns a packed batch into numbers: log-probs, the GRPO loss,
the SFT loss. Only the N completion rows' hidden states go through the lm_head.

Log-probs and the GRPO loss use r1vl_kernels' hidden-state variants with the lm_head fused
in: the (N, V) logits are never materialized. The SFT warm-up's cross-entropy still
projects its rows through the lm_head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from r1vl.model.lora import linear_weight
from r1vl.update.forward import completion_hidden
from r1vl.update.packing import PackedBatch
from r1vl_kernels import GRPOLossOutput, grpo_loss_from_hidden, token_logprobs_from_hidden


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
    """The lm_head's weight (V, H) and bias (V,) or None, as plain tensors; merged with its
    LoRA adapter when lm_head is adapted (r1vl.model.lora)."""
    return linear_weight(model.lm_head)


@torch.no_grad()
def completion_logprobs(model: torch.nn.Module, packed: PackedBatch, temperature: float, impl: str) -> torch.Tensor:
    """(N,) fp32 log softmax(logits / T)[target] of the completion tokens, without gradient:
    the old policy's (num_iterations > 1) and the reference's (beta > 0) log-probs."""
    weight, bias = _lm_head(model)
    return token_logprobs_from_hidden(completion_hidden(model, packed), weight, packed.target_ids, bias=bias,
                                      temperature=temperature, impl=impl)


def policy_loss(model: torch.nn.Module, packed: PackedBatch, advantages: torch.Tensor,
                old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None, *, impl: str,
                softmax: str = "float32", **loss_options) -> GRPOLossOutput:
    """The fused GRPO loss of one packed micro-batch (differentiable w.r.t. the model).

    advantages (S,) fp32, one per packed sequence; old_logp / ref_logp (N,) fp32 or None.
    loss_options: grpo_loss's keywords (temperature, beta, epsilon_low/high, loss_type,
    max_completion_length, num_items_in_batch, ...). Entropy is always returned.
    softmax "float64" (--loss_softmax): the eager float64 form instead of the kernels.
    """
    weight, bias = _lm_head(model)
    if softmax == "float64":
        return _grpo_loss_float64(completion_hidden(model, packed), weight, bias, packed.target_ids,
                                  packed.completion_cu_seqlens, advantages, old_logp, ref_logp, **loss_options)
    return grpo_loss_from_hidden(completion_hidden(model, packed), weight, packed.target_ids,
                                 packed.completion_cu_seqlens, advantages, old_logp, ref_logp, bias=bias,
                                 return_entropy=True, impl=impl, **loss_options)


def _grpo_loss_float64(hidden, weight, bias, target_ids, cu_seqlens, advantages, old_logp, ref_logp, *,
                       temperature: float, beta: float, epsilon_low: float, epsilon_high: float,
                       loss_type: str = "grpo", **unused) -> GRPOLossOutput:
    """loss_type "grpo" with token-level ratios, written out in float64 with autograd: the
    same loss as the kernels up to rounding. Used to check that a result does not hang on
    float32 rounding in the softmax (--loss_softmax float64). Holds the (N, V) logits."""
    if loss_type != "grpo":
        raise ValueError(f"the float64 loss implements loss_type grpo only, got {loss_type!r}")
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    logp = log_probs.gather(1, target_ids[:, None]).squeeze(1)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=logp.device), lengths)
    adv = advantages.double()[seq]
    ratio = torch.exp(logp - (logp.detach() if old_logp is None else old_logp.double()))
    tok_loss = -torch.minimum(ratio * adv, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * adv)
    kl = None
    if ref_logp is not None:
        diff = ref_logp.double() - logp
        kl = torch.exp(diff) - diff - 1
        tok_loss = tok_loss + beta * kl
    per_seq = torch.zeros(lengths.numel(), dtype=torch.float64, device=logp.device).index_add(0, seq, tok_loss)
    loss = (per_seq / lengths.clamp(min=1)).mean()
    n = max(logp.numel(), 1)
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).sum() / n
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).sum() / n
    return GRPOLossOutput(loss=loss.float(), logp=logp.detach().float(),
                          kl=None if kl is None else kl.detach().float(), advantages=advantages.detach(),
                          clip_low_frac=low.float(), clip_high_frac=high.float(), entropy=entropy.float())


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
