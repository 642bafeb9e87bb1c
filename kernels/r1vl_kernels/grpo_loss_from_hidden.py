"""Public API: the GRPO loss and per-token log-probs straight from hidden states, with the
lm_head matmul fused in. The (N, V) logits are never written to memory: at Qwen2-VL's
vocabulary (151,936) they would dominate a GRPO step's memory."""
from typing import Optional

import torch
from torch import Tensor

from . import _checks
from ._setup import check_hyperparameters, check_temperature, id_range_checks, prepare_loss
from .grpo_loss import GRPOLossOutput, epilogue_arguments, make_output
from .ops import op
from . import ops_hidden  # noqa: F401  (registers the ops)


def token_logprobs_from_hidden(hidden: Tensor, weight: Tensor, target_ids: Tensor,
                               bias: Optional[Tensor] = None, temperature: float = 1.0,
                               return_entropy: bool = False, impl: Optional[str] = None):
    """log softmax((hidden @ weight^T + bias) / T)[target] per token, fp32, without gradient:
    old-policy and reference log-probs.

    hidden: (..., H) fp32/bf16/fp16; weight: (V, H) and bias (V,) of the same dtype;
    target_ids: (...) integer in [0, V). Returns logp (...) fp32, or (logp, entropy).
    """
    _checks.check_lm_head(hidden, weight, bias)
    lead = hidden.shape[:-1]
    target = _checks.check_ids(target_ids, lead, hidden.device).reshape(-1)
    check_temperature(temperature)
    impl = _checks.resolve_impl(impl, hidden.device)
    _checks.device_checks(id_range_checks(target, weight.shape[0]), {})
    with torch.no_grad():
        logp, entropy = op("token_logprobs_from_hidden")(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias, target, float(temperature), return_entropy, impl)
    logp = logp.view(lead)
    return (logp, entropy.view(lead)) if return_entropy else logp


def grpo_loss_from_hidden(
    hidden: Tensor, weight: Tensor, target_ids: Tensor, cu_seqlens: Optional[Tensor] = None,
    advantages: Optional[Tensor] = None, old_logp: Optional[Tensor] = None,
    ref_logp: Optional[Tensor] = None, *, bias: Optional[Tensor] = None,
    completion_mask: Optional[Tensor] = None, rewards: Optional[Tensor] = None,
    group_size: Optional[int] = None, scale_rewards: str = "group", temperature: float = 1.0,
    beta: float = 0.0, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
    delta: Optional[float] = None, loss_type: str = "grpo", importance_sampling_level: str = "token",
    max_completion_length: Optional[int] = None, num_items_in_batch: Optional[float] = None,
    policy_weight: Optional[Tensor] = None, off_policy_threshold: Optional[float] = None,
    sampling_logp: Optional[Tensor] = None, bias_correction_kl: bool = False,
    sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0, vespo_log_offset: Optional[Tensor] = None,
    return_entropy: bool = False, impl: Optional[str] = None,
) -> GRPOLossOutput:
    """grpo_loss (same semantics, options and output: loss types, policy_weight, the
    off-policy mask, bias_correction_kl) with logits = hidden @ weight^T + bias.

    hidden      (N, H) packed, or (B, L, H) padded with completion_mask (B, L): the final
                hidden states at the completion positions; fp32 / bf16 / fp16
    weight      (V, H) the lm_head weight, same dtype (a plain tensor: under ZeRO-3 gather it
                first, e.g. inside deepspeed.zero.GatheredParameters)
    bias        (V,) or None
    out.loss is differentiable with respect to hidden, weight and bias; their gradients are
    accumulated in fp32 ((N, H) and (V, H) buffers) and cast to their dtype.

    Passes: one forward pass over hidden x weight (online logsumexp, target logit, entropy)
    and one backward pass (recomputed logit tiles, then dhidden and dweight), for every loss
    type and for token- and sequence-level importance sampling alike. On CPU the eager path
    works in token x vocabulary chunks and never holds N x V either.
    """
    _checks.check_lm_head(hidden, weight, bias)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (N, H) packed or (B, L, H) padded, got shape {tuple(hidden.shape)}")
    check_hyperparameters(temperature, epsilon_low, epsilon_high, delta, beta, ref_logp, loss_type,
                          importance_sampling_level)
    _checks.check_policy_options(loss_type, epsilon_high, sapo_temperature_pos, sapo_temperature_neg,
                                 off_policy_threshold, sampling_logp)
    setup = prepare_loss(
        "hidden", hidden.shape[:-1], weight.shape[0], hidden.device, target_ids, cu_seqlens,
        completion_mask, advantages, old_logp, ref_logp, rewards=rewards, group_size=group_size,
        scale_rewards=scale_rewards, loss_type=loss_type, max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch, impl=impl, policy_weight=policy_weight,
        sampling_logp=sampling_logp)
    rows = hidden
    if setup.flat_idx is not None:  # padded: gather the completion rows (N x H, small next to N x V)
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, setup.flat_idx)
    loss, logp, _, _, kl, entropy, low, high = op("grpo_loss_from_hidden_fwd")(
        hidden=rows, weight=weight, bias=bias, target_ids=setup.target, temperature=float(temperature),
        with_entropy=return_entropy,
        **epilogue_arguments(setup, loss_type, importance_sampling_level, beta, epsilon_low, epsilon_high,
                             delta, off_policy_threshold, bias_correction_kl, sapo_temperature_pos,
                             sapo_temperature_neg, (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg),
                             vespo_log_offset))
    return make_output(setup, loss, logp, kl, entropy, low, high, return_entropy)
