"""Public API: the fused GRPO loss, per-token log-probs and group-relative advantages.

Packed layout (the native one): rows are the completion tokens of S sequences,
concatenated; cu_seqlens (S+1,) int32 starts at 0 and ends at N. Padded layout (what TRL
and verl hold): logits (B, L, V) with a (B, L) completion mask; it gives the same results.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import _checks
from ._setup import LossSetup, check_hyperparameters, check_temperature, id_range_checks, prepare_loss
from . import ops_one_sweep  # noqa: F401  (registers the one-sweep op)
from ._terms import PER_SEQ_MEAN_LOSSES, POLICY_OF_LOSS
from .ops import op


@dataclass
class GRPOLossOutput:
    """What grpo_loss returns. Token-shaped fields are (N,) packed or (B, L) padded (zero
    where the mask is 0); everything but `loss` is detached."""
    loss: Tensor                # () fp32, differentiable with respect to logits
    logp: Tensor                # (N,) | (B, L) fp32: log softmax(logits / T)[target]
    kl: Optional[Tensor]        # (N,) | (B, L) fp32 k3 KL to the reference (times the importance
                                # ratio with bias_correction_kl); None without ref_logp
    advantages: Tensor          # (S,) fp32, given or computed from rewards
    clip_low_frac: Tensor       # () fp32: share of tokens with ratio < 1 - eps_low and A < 0
    clip_high_frac: Tensor      # () fp32: share of tokens with ratio > 1 + eps_high and A > 0
    entropy: Optional[Tensor]   # (N,) | (B, L) fp32 entropy of softmax(logits / T), if asked


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group",
                     eps: float = 1e-4, impl: Optional[str] = None) -> Tensor:
    """Group-relative advantages, TRL's convention.

    rewards: (S,) float, sequences ordered group by group (G = group_size consecutive
    completions of one prompt). A = r - mean_G(r), divided by (std + eps) where std is the
    unbiased std of the group ("group"), of the whole batch ("batch"), or not at all
    ("none", Dr. GRPO). Returns (S,) fp32, no gradient.
    """
    if not isinstance(rewards, Tensor) or rewards.dim() != 1 or not rewards.dtype.is_floating_point:
        raise ValueError("rewards must be a 1-D floating-point tensor (S,)")
    _checks.check_group("S", rewards.shape[0], group_size, scale_rewards)
    impl = _checks.resolve_impl(impl, rewards.device)
    with torch.no_grad():
        return op("group_advantages")(rewards.detach().float().contiguous(), group_size, scale_rewards, float(eps), impl)


def token_logprobs(logits: Tensor, target_ids: Tensor, temperature: float = 1.0,
                   return_entropy: bool = False, impl: Optional[str] = None):
    """log softmax(logits / T)[target] per token, in fp32, without gradient.

    logits: (..., V) fp32/bf16/fp16 with unit stride along V (strided views such as
    logits[:, :-1] of a (B, L+1, V) tensor are read in place). target_ids: (...) integer.
    Returns logp (...) fp32, or (logp, entropy) with return_entropy.
    """
    _checks.check_logits(logits)
    lead, V = logits.shape[:-1], logits.shape[-1]
    target = _checks.check_ids(target_ids, lead, logits.device).reshape(-1)
    check_temperature(temperature)
    impl = _checks.resolve_impl(impl, logits.device)
    rows, flat_idx = _as_rows(logits)
    _checks.device_checks(id_range_checks(target, V), {})
    with torch.no_grad():
        logp, entropy = op("token_logprobs")(rows, target, flat_idx, float(temperature), return_entropy, impl)
    logp = logp.view(lead)
    return (logp, entropy.view(lead)) if return_entropy else logp


def grpo_loss(
    logits: Tensor, target_ids: Tensor, cu_seqlens: Optional[Tensor] = None,
    advantages: Optional[Tensor] = None, old_logp: Optional[Tensor] = None,
    ref_logp: Optional[Tensor] = None, *, completion_mask: Optional[Tensor] = None,
    rewards: Optional[Tensor] = None, group_size: Optional[int] = None,
    scale_rewards: str = "group", temperature: float = 1.0, beta: float = 0.0,
    epsilon_low: float = 0.2, epsilon_high: float = 0.2, delta: Optional[float] = None,
    loss_type: str = "grpo", importance_sampling_level: str = "token",
    max_completion_length: Optional[int] = None, num_items_in_batch: Optional[float] = None,
    policy_weight: Optional[Tensor] = None, off_policy_threshold: Optional[float] = None,
    sampling_logp: Optional[Tensor] = None, bias_correction_kl: bool = False,
    sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0, vespo_log_offset: Optional[Tensor] = None,
    return_entropy: bool = False, inplace_backward: bool = False, impl: Optional[str] = None,
) -> GRPOLossOutput:
    """The GRPO loss from logits. Triton, token-level importance sampling: forward and
    backward in one sweep (each row read twice while in L2, dlogits written in forward).
    Otherwise one sweep of the vocabulary forward, one backward.

    Packed layout:
        logits      (N, V) fp32 / bf16 / fp16, unit stride along V: row t scores target_ids[t]
        target_ids  (N,) int64 (any integer dtype), 0 <= id < V
        cu_seqlens  (S+1,) int32: sequence s owns rows cu_seqlens[s]:cu_seqlens[s+1]
    Padded layout (TRL, verl): logits (B, L, V) (a strided view like logits[:, :-1] is read
        in place), target_ids (B, L), completion_mask (B, L) of 0/1 (default: all ones),
        cu_seqlens None; S = B. Token-shaped inputs and outputs are then (B, L).
    advantages  (S,) float, one per sequence; or rewards (S,) + group_size, normalized here
                by group_advantages(rewards, group_size, scale_rewards) (eps 1e-4).
    old_logp    (N,) float log-probs of the sampling policy; None = on-policy (old =
                logp.detach(), ratio 1).
    ref_logp    (N,) float reference log-probs; required when beta != 0.

    Per token: ratio = exp(logp - old_logp), or at importance_sampling_level="sequence"
    (GSPO) exp(mean over the sequence of logp - old_logp), and
        loss_t = policy_weight_t * keep_s * policy_t + beta * KL_t
    with TRL's (1.16) terms, by loss_type:
        grpo, bnpo, dr_grpo, dapo, luspo: policy_t = -min(ratio A, clamp(ratio, 1 - epsilon_low,
            1 + epsilon_high) A), ratio capped at delta if given (two-sided clipping);
        cispo: policy_t = -sg(min(ratio, epsilon_high)) A logp_t (no gradient through the ratio);
        sapo: policy_t = -sigmoid(tau (ratio - 1)) 4 / tau A, tau = sapo_temperature_pos if
            A > 0 else sapo_temperature_neg;
    KL_t = exp(ref - logp) - (ref - logp) - 1, times the ratio with bias_correction_kl.
    policy_weight (N,) | (B, L) float, no gradient: TRL's vLLM importance-sampling
    correction (token or sequence level, broadcast to tokens), its entropy mask, or any
    product of them; default 1. keep_s, the off-policy sequence mask (DeepSeek-V3.2, TRL's
    off_policy_mask_threshold), is 1 unless off_policy_threshold is given: then a sequence
    with A < 0 is dropped when its mean of sampling_logp - logp (NaN counted as 0) exceeds
    the threshold; sampling_logp (same shape as old_logp) defaults to old_logp.
        vespo: policy_t = -sg(phi_s) A logp_t, phi_s = exp(lam + k log w - lam w) with
            log w = clamp(sum over the sequence of clamp(logp - old, -20, 20) + vespo_log_offset_s,
            log 1e-8, 20) and (k, lam) = (vespo_k_pos, vespo_lambda_pos) if A >= 0 else the
            _neg pair (TRL's vespo; vespo_log_offset (S,): its summed, clamped log vLLM ratios);
    Reduction: "grpo" and "sapo" mean over sequences of each sequence's token mean;
    "bnpo" sum / N; "dr_grpo" sum / (S * max_completion_length) (default: the longest
    sequence, or L in the padded layout); "dapo", "cispo" and "vespo" sum / num_items_in_batch
    (default N); "luspo" sum / S.

    inplace_backward: the backward writes dlogits over the logits, saving one N x V buffer.
    Hazard: the logits tensor holds gradients afterwards; any other use of it must come
    before backward. Its version counter is bumped, so another autograd use of it fails
    loudly rather than silently. Needs logits viewable as (rows, V).

    Host syncs: one, for the input checks (ids in range, cu_seqlens well-formed) and the
    dr_grpo default; the padded layout adds one to count its tokens. Under torch.compile
    the checks are skipped; give max_completion_length for dr_grpo there.
    impl: None picks Triton for CUDA tensors, eager torch on CPU (Triton there too when
    TRITON_INTERPRET=1); "triton" or "torch" forces one.
    """
    _checks.check_logits(logits)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be (N, V) packed or (B, L, V) padded, got shape {tuple(logits.shape)}")
    check_hyperparameters(temperature, epsilon_low, epsilon_high, delta, beta, ref_logp, loss_type,
                          importance_sampling_level)
    _checks.check_policy_options(loss_type, epsilon_high, sapo_temperature_pos, sapo_temperature_neg,
                                 off_policy_threshold, sampling_logp)
    setup = prepare_loss(
        "logits", logits.shape[:-1], logits.shape[-1], logits.device, target_ids, cu_seqlens,
        completion_mask, advantages, old_logp, ref_logp, rewards=rewards, group_size=group_size,
        scale_rewards=scale_rewards, loss_type=loss_type, max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch, impl=impl, policy_weight=policy_weight,
        sampling_logp=sampling_logp)
    if inplace_backward and logits.dim() == 3 and not logits.is_contiguous():
        raise ValueError("inplace_backward needs contiguous padded logits (B, L, V)")
    if (importance_sampling_level == "token" and not inplace_backward and setup.impl == "triton"
            and logits.requires_grad and torch.is_grad_enabled() and _one_sweep_covers(
                loss_type, setup, off_policy_threshold, bias_correction_kl)):
        # One sweep: dlogits written in forward (ops_one_sweep; the two-sweep path below
        # stays for the sequence level, the in-place option and the eager path).
        loss, logp, _, _, kl, entropy, low, high, _ = op("grpo_loss_one_sweep")(
            logits, setup.target, setup.flat_idx, setup.cu_seqlens, setup.advantages, setup.old_logp,
            setup.ref_logp, float(temperature), float(beta), float(epsilon_low), float(epsilon_high),
            None if delta is None else float(delta), setup.inv_norm, loss_type == "grpo", return_entropy)
        return make_output(setup, loss, logp, kl, entropy, low, high, return_entropy)
    loss, logp, _, _, kl, entropy, low, high = op("grpo_loss_fwd")(
        logits=logits, target_ids=setup.target, flat_idx=setup.flat_idx, temperature=float(temperature),
        with_entropy=return_entropy, inplace_backward=inplace_backward,
        **epilogue_arguments(setup, loss_type, importance_sampling_level, beta, epsilon_low, epsilon_high,
                             delta, off_policy_threshold, bias_correction_kl, sapo_temperature_pos,
                             sapo_temperature_neg, (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg),
                             vespo_log_offset))
    return make_output(setup, loss, logp, kl, entropy, low, high, return_entropy)


def _one_sweep_covers(loss_type, setup: LossSetup, off_policy_threshold, bias_correction_kl) -> bool:
    """Whether the one-sweep op computes this loss: the clipped policy term of the four
    original loss types with no per-token weight, sampling log-probs, off-policy mask or
    bias-corrected KL (those options go through the two-sweep epilogue)."""
    return (loss_type in ("grpo", "bnpo", "dr_grpo", "dapo") and setup.policy_weight is None
            and setup.sampling_logp is None and off_policy_threshold is None and not bias_correction_kl)


def epilogue_arguments(setup: LossSetup, loss_type, importance_sampling_level, beta, epsilon_low,
                       epsilon_high, delta, off_policy_threshold, bias_correction_kl,
                       sapo_temperature_pos, sapo_temperature_neg, vespo_params, vespo_log_offset) -> dict:
    """The arguments both forward ops share (see ops.grpo_loss_fwd), by name."""
    S = setup.advantages.shape[0]
    offset = _checks.check_float_vector("vespo_log_offset", vespo_log_offset, (S,), setup.advantages.device)
    if offset is not None and loss_type != "vespo":
        raise ValueError("vespo_log_offset is only read by loss_type='vespo'")
    k_pos, lambda_pos, k_neg, lambda_neg = (float(x) for x in vespo_params)
    return dict(
        vespo_log_offset=None if offset is None else offset.contiguous(), vespo_k_pos=k_pos,
        vespo_lambda_pos=lambda_pos, vespo_k_neg=k_neg, vespo_lambda_neg=lambda_neg,
        cu_seqlens=setup.cu_seqlens, advantages=setup.advantages, old_logp=setup.old_logp,
        ref_logp=setup.ref_logp, policy_weight=setup.policy_weight, sampling_logp=setup.sampling_logp,
        beta=float(beta), eps_low=float(epsilon_low), eps_high=float(epsilon_high),
        delta=None if delta is None else float(delta), inv_norm=setup.inv_norm,
        per_seq_mean=loss_type in PER_SEQ_MEAN_LOSSES, seq_level=importance_sampling_level == "sequence",
        policy=POLICY_OF_LOSS[loss_type], sapo_tau_pos=float(sapo_temperature_pos),
        sapo_tau_neg=float(sapo_temperature_neg),
        off_policy_threshold=None if off_policy_threshold is None else float(off_policy_threshold),
        bias_correction_kl=bool(bias_correction_kl), impl=setup.impl)


def make_output(setup: LossSetup, loss, logp, kl, entropy, low, high, return_entropy) -> GRPOLossOutput:
    """The public output from a forward op's (N,)-shaped results, in the caller's layout."""
    return GRPOLossOutput(
        loss=loss, logp=setup.unpack(logp), kl=setup.unpack(kl) if setup.ref_logp is not None else None,
        advantages=setup.advantages.detach(), clip_low_frac=low.detach(), clip_high_frac=high.detach(),
        entropy=setup.unpack(entropy) if return_entropy else None)


# ----------------------------------------------------------------------------- helpers


def _as_rows(logits: Tensor):
    """(rows, flat_idx): logits as (R, V) when a view allows it, else (B, L, V) with every
    position indexed (strided views are read in place, never copied)."""
    try:
        return logits.view(-1, logits.shape[-1]), None
    except RuntimeError:
        if logits.dim() != 3:
            raise ValueError("logits with more than 2 leading dimensions must be viewable as (rows, V)") from None
        n = logits.shape[0] * logits.shape[1]
        return logits, torch.arange(n, device=logits.device)
