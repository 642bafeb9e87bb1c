"""The O(N) per-token terms of the GRPO loss: group-relative advantages and each token's
loss term and dLoss/dlogp, once a vocabulary (or hidden-state) sweep has given its log-prob.

These run after the sweep, on per-token fp32 vectors; their cost is a few microseconds next
to the sweeps over N x V logits. One program per group (advantages) or per sequence (loss
terms), so sequence-level importance weights need no extra launch. Two Triton device
functions serve the other kernels too: clip_policy, the clipped policy term, and token_dlogp,
a token's dLoss/dlogp under token-level importance sampling (logits.py's one-sweep loss).

Read in order: the kernels, their launchers, the group_advantages op, the epilogue every
forward loss op ends with (loss_terms), then the public group_advantages.
"""
import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import options, reference
from .options import POLICIES, TermsConfig
from .registry import LIBRARY, op

VESPO_LOG_W_MIN = tl.constexpr(options.VESPO_LOG_W_MIN)

SCALE_CODES = {"none": 0, "group": 1, "batch": 2}


# ----------------------------------------------------------------------------- kernels


@triton.jit
def clip_policy(ratio, adv, eps_low, eps_high, delta, HAS_DELTA: tl.constexpr):
    """The clipped policy term of one token or a block of tokens (fp32), TRL's convention:
    -min(c1 A, c2 A) with c1 = ratio (capped at delta if HAS_DELTA), c2 = clamp(ratio,
    1 - eps_low, 1 + eps_high). Returns (term, d term / d ratio, c1); torch's subgradients:
    clamp passes gradient on its closed interval, min splits it evenly on ties."""
    coef_2 = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
    d_coef_2 = tl.where((ratio >= 1.0 - eps_low) & (ratio <= 1.0 + eps_high), 1.0, 0.0)
    if HAS_DELTA:
        coef_1 = tl.minimum(ratio, delta)
        d_coef_1 = tl.where(ratio <= delta, 1.0, 0.0)
    else:
        coef_1 = ratio
        d_coef_1 = tl.where(ratio == ratio, 1.0, 1.0)  # ones of ratio's shape, scalar or block
    u1 = coef_1 * adv
    u2 = coef_2 * adv
    d_pick = tl.where(u1 < u2, d_coef_1, tl.where(u2 < u1, d_coef_2, 0.5 * (d_coef_1 + d_coef_2)))
    return -tl.minimum(u1, u2), -adv * d_pick, coef_1


@triton.jit
def token_dlogp(lp, old, ref, adv, w, eps_low, eps_high, delta, beta,
                HAS_OLD: tl.constexpr, USE_KL: tl.constexpr, HAS_DELTA: tl.constexpr):
    """dLoss/dlogp of one token under token-level importance sampling, for kernels that know
    a token's log-prob and must act on its gradient at once (logits' one-sweep loss). The
    formula and its conventions are _grpo_terms_kernel's, with the clipped policy term:
        dLoss/dlogp = w * (-A * dmin/dratio * ratio + beta * (1 - exp(ref - logp)))
    where w is the token's weight in the reduction (the loss type's 1 / normalizer, divided by
    the sequence length for "grpo"). lp, old, ref, adv, w: fp32 scalars (old / ref ignored
    without HAS_OLD / USE_KL). tests/kernels/test_grpo_loss_one_sweep.py checks that both
    kernels agree."""
    if HAS_OLD:
        ratio = tl.exp(lp - old)
    else:
        ratio = tl.exp(lp - lp)  # old = logp.detach(): ratio 1
    _, d_ratio, _ = clip_policy(ratio, adv, eps_low, eps_high, delta, HAS_DELTA)
    dlogp = d_ratio * ratio
    if USE_KL:
        dlogp += beta * (1.0 - tl.exp(ref - lp))
    return w * dlogp


@triton.jit
def _group_advantages_kernel(
    rewards_ptr, adv_ptr,       # (S,) fp32 in, (S,) fp32 out; sequences ordered group by group
    S, G, eps,
    SCALE: tl.constexpr,        # 0 none, 1 group std, 2 batch std
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """A = (r - mean_group(r)) / (std + eps), std unbiased as torch.std (TRL's convention)."""
    grp = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_G)
    mask = offs < G
    r = tl.load(rewards_ptr + grp * G + offs, mask=mask, other=0.0)
    adv = tl.where(mask, r - tl.sum(r, axis=0) / G, 0.0)
    if SCALE == 1:
        std = tl.sqrt(tl.sum(adv * adv, axis=0) / (G - 1))
        adv = adv / (std + eps)
    elif SCALE == 2:
        # Every group program recomputes the batch std: S reads each, which at S of a few
        # thousand costs less than a second launch and a global barrier.
        cols = tl.arange(0, BLOCK_S)
        acc = tl.zeros((BLOCK_S,), tl.float32)
        for start in range(0, S, BLOCK_S):
            acc += tl.load(rewards_ptr + start + cols, mask=start + cols < S, other=0.0)
        mean = tl.sum(acc, axis=0) / S
        acc = tl.zeros((BLOCK_S,), tl.float32)
        for start in range(0, S, BLOCK_S):
            x = tl.load(rewards_ptr + start + cols, mask=start + cols < S, other=0.0)
            acc += tl.where(start + cols < S, (x - mean) * (x - mean), 0.0)
        std = tl.sqrt(tl.sum(acc, axis=0) / (S - 1))
        adv = adv / (std + eps)
    tl.store(adv_ptr + grp * G + offs, adv, mask=mask)


@triton.jit
def _grpo_terms_kernel(
    logp_ptr, old_ptr, ref_ptr,  # (N,) fp32; old used if HAS_OLD, ref if HAS_REF
    weight_ptr, samp_ptr,        # (N,) fp32: policy-term weight (HAS_WEIGHT), sampling logp (HAS_SAMP)
    adv_ptr, cu_ptr,             # (S,) fp32, (S+1,) int32
    offset_ptr,                  # (S,) fp32 vespo's log-weight offset (HAS_OFFSET)
    dlogp_ptr, kl_ptr,           # (N,) fp32 out: dLoss/dlogp, KL term (if HAS_REF)
    seq_loss_ptr, seq_low_ptr, seq_high_ptr,  # (S,) fp32 out: weighted loss, clip counts
    eps_low, eps_high, delta, beta, inv_norm, tau_pos, tau_neg, opsm_threshold,
    k_pos, lam_pos, k_neg, lam_neg,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, USE_KL: tl.constexpr,
    HAS_DELTA: tl.constexpr, SEQ_LEVEL: tl.constexpr, PER_SEQ_MEAN: tl.constexpr,
    POLICY: tl.constexpr,        # 0 clip, 1 cispo, 2 sapo, 3 vespo (see options.POLICIES)
    DETACHED_RATIO: tl.constexpr,  # cispo, vespo: no gradient through the ratio
    HAS_WEIGHT: tl.constexpr, HAS_OPSM: tl.constexpr, HAS_SAMP: tl.constexpr, HAS_OFFSET: tl.constexpr,
    BIAS_KL: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Loss terms of one sequence, following TRL's GRPOTrainer._compute_loss (trl 1.16).

    r = exp(logp - old) (token) or exp(masked mean of logp - old) (sequence). Policy term:
    clip  -min(r1 A, r2 A), r2 = clamp(r, 1 - eps_low, 1 + eps_high), r1 = r capped at delta;
    cispo -sg(min(r, eps_high)) A logp; sapo -sigmoid(tau (r - 1)) 4 / tau A; vespo
    -sg(phi) A logp with phi of the sequence's summed log-ratio (see options.POLICIES). It is multiplied
    by the token's weight (HAS_WEIGHT) and by the off-policy mask (HAS_OPSM: the sequence is
    kept if A >= 0 or the mean of sampling_logp - logp is <= opsm_threshold). Then
    + beta * KL, KL = k3 (times r with BIAS_KL). Reduction weight w = inv_norm / n (grpo)
    or inv_norm. Gradients follow torch's conventions: clamp passes gradient on its closed
    interval, min splits it evenly on ties (so on-policy, r = 1, it is -A exactly).

    At sequence level r is the same for the n tokens of a sequence and d r / d logp_t = r / n:
    the policy part of dLoss/dlogp_t is w * f'(r) r * (mean of the token weights), the same
    for every token; with BIAS_KL the KL part adds w * beta * r * (mean of the k3 KL).
    """
    seq = tl.program_id(0)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    end = tl.load(cu_ptr + seq + 1).to(tl.int64)
    n = tl.maximum(end - start, 1).to(tl.float32)
    adv = tl.load(adv_ptr + seq)
    w = inv_norm
    if PER_SEQ_MEAN:
        w = w / n
    cols = tl.arange(0, BLOCK_T)

    # Pass 1, only when something depends on the whole sequence: its sums.
    seq_log_ratio = tl.zeros((), tl.float32)
    mean_weight = tl.full((), 1.0, tl.float32)
    mean_kl = tl.zeros((), tl.float32)
    keep = tl.full((), 1.0, tl.float32)
    phi = tl.zeros((), tl.float32)
    if SEQ_LEVEL or HAS_OPSM or POLICY == 3:
        acc_ratio = tl.zeros((BLOCK_T,), tl.float32)
        acc_weight = tl.zeros((BLOCK_T,), tl.float32)
        acc_kl = tl.zeros((BLOCK_T,), tl.float32)
        acc_drift = tl.zeros((BLOCK_T,), tl.float32)
        acc_vespo = tl.zeros((BLOCK_T,), tl.float32)
        for off in range(start, end, BLOCK_T):
            mask = off + cols < end
            lp = tl.load(logp_ptr + off + cols, mask=mask, other=0.0)
            if POLICY == 3 and HAS_OLD:
                lr = lp - tl.load(old_ptr + off + cols, mask=mask, other=0.0)
                acc_vespo += tl.minimum(tl.maximum(lr, -20.0), 20.0)
            if SEQ_LEVEL:
                if HAS_OLD:
                    acc_ratio += lp - tl.load(old_ptr + off + cols, mask=mask, other=0.0)
                if HAS_WEIGHT:
                    acc_weight += tl.load(weight_ptr + off + cols, mask=mask, other=0.0)
                if BIAS_KL and HAS_REF:
                    diff = tl.load(ref_ptr + off + cols, mask=mask, other=0.0) - lp
                    acc_kl += tl.where(mask, tl.exp(diff) - diff - 1.0, 0.0)
            if HAS_OPSM:
                if HAS_SAMP:
                    sampled = tl.load(samp_ptr + off + cols, mask=mask, other=0.0)
                elif HAS_OLD:
                    sampled = tl.load(old_ptr + off + cols, mask=mask, other=0.0)
                else:
                    sampled = lp
                drift = sampled - lp
                acc_drift += tl.where(mask & (drift == drift), drift, 0.0)  # NaN: no evidence
        seq_log_ratio = tl.sum(acc_ratio, axis=0) / n
        if HAS_WEIGHT:
            mean_weight = tl.sum(acc_weight, axis=0) / n
        mean_kl = tl.sum(acc_kl, axis=0) / n
        if HAS_OPSM:
            keep = tl.where((adv >= 0.0) | (tl.sum(acc_drift, axis=0) / n <= opsm_threshold), 1.0, 0.0)
        if POLICY == 3:
            log_w = tl.sum(acc_vespo, axis=0)
            if HAS_OFFSET:
                log_w += tl.load(offset_ptr + seq)
            log_w = tl.minimum(tl.maximum(log_w, VESPO_LOG_W_MIN), 20.0)
            k = tl.where(adv >= 0.0, k_pos, k_neg)
            lam = tl.maximum(tl.where(adv >= 0.0, lam_pos, lam_neg), 1e-4)
            phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
            phi = tl.where((phi == phi) & (phi < float("inf")), phi, 0.0)  # TRL's nan_to_num(0)
    mean_weight = mean_weight * keep
    if POLICY == 2:
        tau = tl.where(adv > 0.0, tau_pos, tau_neg)

    # Pass 2: per token.
    loss_acc = tl.zeros((BLOCK_T,), tl.float32)
    low_acc = tl.zeros((BLOCK_T,), tl.float32)
    high_acc = tl.zeros((BLOCK_T,), tl.float32)
    for off in range(start, end, BLOCK_T):
        mask = off + cols < end
        lp = tl.load(logp_ptr + off + cols, mask=mask, other=0.0)
        if SEQ_LEVEL:
            log_ratio = tl.zeros((BLOCK_T,), tl.float32) + seq_log_ratio
        elif HAS_OLD:
            log_ratio = lp - tl.load(old_ptr + off + cols, mask=mask, other=0.0)
        else:
            log_ratio = tl.zeros((BLOCK_T,), tl.float32)  # old = logp.detach(): ratio 1
        ratio = tl.exp(log_ratio)
        if HAS_WEIGHT:
            weight = tl.load(weight_ptr + off + cols, mask=mask, other=0.0) * keep
        else:
            weight = tl.zeros((BLOCK_T,), tl.float32) + keep
        if POLICY == 0:
            policy, d_ratio, coef_1 = clip_policy(ratio, adv, eps_low, eps_high, delta, HAS_DELTA)
            d_policy = d_ratio * ratio
            low_acc += tl.where(mask & (coef_1 < 1.0 - eps_low), 1.0, 0.0)
            high_acc += tl.where(mask & (coef_1 > 1.0 + eps_high), 1.0, 0.0)
        elif POLICY == 1:
            capped = tl.minimum(ratio, eps_high)
            policy = -capped * adv * lp
            d_policy = -capped * adv
            high_acc += tl.where(mask & (ratio > eps_high), 1.0, 0.0)
        elif POLICY == 3:
            policy = -phi * adv * lp
            d_policy = tl.zeros((BLOCK_T,), tl.float32) - phi * adv
        else:
            sig = tl.sigmoid(tau * (ratio - 1.0))
            policy = -sig * (4.0 / tau) * adv
            d_policy = -adv * 4.0 * sig * (1.0 - sig) * ratio
        tok_loss = weight * policy
        if DETACHED_RATIO:
            dlogp = weight * d_policy
        elif SEQ_LEVEL:
            dlogp = mean_weight * d_policy
        else:
            dlogp = weight * d_policy
        if HAS_REF:
            ref = tl.load(ref_ptr + off + cols, mask=mask, other=0.0)
            diff = ref - lp
            e = tl.exp(diff)
            kl = e - diff - 1.0
            d_kl = 1.0 - e
            if BIAS_KL:
                if SEQ_LEVEL:
                    d_kl = d_kl * ratio + mean_kl * ratio
                else:
                    d_kl = d_kl * ratio + kl * ratio
                kl = kl * ratio
            tl.store(kl_ptr + off + cols, kl, mask=mask)
            if USE_KL:
                tok_loss += beta * kl
                dlogp += beta * d_kl
        tl.store(dlogp_ptr + off + cols, w * dlogp, mask=mask)
        loss_acc += tl.where(mask, tok_loss, 0.0)
    tl.store(seq_loss_ptr + seq, w * tl.sum(loss_acc, axis=0))
    # TRL counts a token as clipped only where the clip binds: low with A < 0, high with A > 0.
    tl.store(seq_low_ptr + seq, tl.where(adv < 0.0, tl.sum(low_acc, axis=0), 0.0))
    tl.store(seq_high_ptr + seq, tl.where(adv > 0.0, tl.sum(high_acc, axis=0), 0.0))


# ----------------------------------------------------------------------------- launchers


def launch_group_advantages(rewards, group_size: int, scale_rewards: str, eps: float):
    """rewards: (S,) fp32, S a multiple of group_size. Returns (S,) fp32 advantages."""
    S = rewards.shape[0]
    adv = torch.empty_like(rewards)
    _group_advantages_kernel[(S // group_size,)](
        rewards, adv, S, group_size, eps, SCALE=SCALE_CODES[scale_rewards],
        BLOCK_G=triton.next_power_of_2(group_size), BLOCK_S=1024,
    )
    return adv


def grpo_terms(logp, old_logp, ref_logp, advantages, cu_seqlens, policy_weight, sampling_logp,
               vespo_log_offset, cfg: TermsConfig):
    """Per-token dLoss/dlogp and KL term, per-sequence loss and clip counts; see the kernel.

    logp, old_logp, ref_logp, policy_weight, sampling_logp: (N,) fp32 (all but logp may be
    None). advantages, vespo_log_offset (or None): (S,) fp32. cu_seqlens: (S+1,) int32. Returns dlogp (N,), kl (N,)
    (empty without ref_logp), seq_loss (S,), seq_low (S,), seq_high (S,), all fp32.
    """
    S = advantages.shape[0]
    dlogp = torch.empty_like(logp)
    kl = torch.empty_like(logp) if ref_logp is not None else logp.new_empty(0)
    seq_stats = torch.empty(3, S, dtype=torch.float32, device=logp.device)
    if S > 0:
        opsm = cfg.off_policy_threshold is not None
        _grpo_terms_kernel[(S,)](
            logp, old_logp if old_logp is not None else logp,
            ref_logp if ref_logp is not None else logp,
            policy_weight if policy_weight is not None else logp,
            sampling_logp if sampling_logp is not None else logp,
            advantages, cu_seqlens, vespo_log_offset if vespo_log_offset is not None else advantages,
            dlogp, kl if ref_logp is not None else dlogp,
            seq_stats[0], seq_stats[1], seq_stats[2],
            cfg.eps_low, cfg.eps_high, cfg.delta if cfg.delta is not None else 0.0, cfg.beta, cfg.inv_norm,
            cfg.sapo_tau_pos, cfg.sapo_tau_neg, cfg.off_policy_threshold if opsm else 0.0,
            cfg.vespo_k_pos, cfg.vespo_lambda_pos, cfg.vespo_k_neg, cfg.vespo_lambda_neg,
            HAS_OLD=old_logp is not None, HAS_REF=ref_logp is not None,
            USE_KL=ref_logp is not None and cfg.beta != 0.0, HAS_DELTA=cfg.delta is not None,
            SEQ_LEVEL=cfg.seq_level, PER_SEQ_MEAN=cfg.per_seq_mean, POLICY=POLICIES.index(cfg.policy),
            DETACHED_RATIO=cfg.policy in ("cispo", "vespo"),
            HAS_WEIGHT=policy_weight is not None, HAS_OPSM=opsm, HAS_SAMP=sampling_logp is not None,
            HAS_OFFSET=vespo_log_offset is not None,
            BIAS_KL=cfg.bias_correction_kl, BLOCK_T=256,
        )
    return dlogp, kl, seq_stats[0], seq_stats[1], seq_stats[2]


# ----------------------------------------------------------------------------- the advantages op


@torch.library.custom_op(f"{LIBRARY}::group_advantages", mutates_args=())
def group_advantages_op(rewards: Tensor, group_size: int, scale_rewards: str, eps: float,
                        impl: str) -> Tensor:
    """(S,) fp32 group-normalized advantages of (S,) fp32 rewards."""
    if impl == "torch":
        return reference.group_advantages(rewards, group_size, scale_rewards, eps)
    return launch_group_advantages(rewards, group_size, scale_rewards, eps)


@group_advantages_op.register_fake
def _(rewards, group_size, scale_rewards, eps, impl):
    return torch.empty_like(rewards)


# ----------------------------------------------------------------------------- the epilogue of the forward ops


def terms_config(op_arguments: dict) -> TermsConfig:
    """The epilogue's options from a forward op's arguments (its parameters carry the names
    of TermsConfig's fields)."""
    return TermsConfig(**{f.name: op_arguments[f.name] for f in dataclasses.fields(TermsConfig)})


def loss_terms(impl: str, logp, lse, entropy, old_logp, ref_logp, policy_weight, sampling_logp,
               vespo_log_offset, advantages, cu_seqlens, cfg: TermsConfig):
    """The O(N) epilogue of a forward op, after the sweep gave logp, lse, entropy: the
    outputs of logits.grpo_loss_fwd (see there). impl: "triton" (grpo_terms) or "torch"
    (reference.grpo_terms)."""
    terms = reference.grpo_terms if impl == "torch" else grpo_terms
    dlogp, kl, seq_loss, seq_low, seq_high = terms(
        logp, old_logp, ref_logp, advantages, cu_seqlens, policy_weight, sampling_logp, vespo_log_offset, cfg)
    n_tokens = max(logp.shape[0], 1)
    return (seq_loss.sum(), logp, lse, dlogp, kl, entropy,
            seq_low.sum() / n_tokens, seq_high.sum() / n_tokens)


# ----------------------------------------------------------------------------- public


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
    options.check_group("S", rewards.shape[0], group_size, scale_rewards)
    impl = options.resolve_impl(impl, rewards.device)
    with torch.no_grad():
        return op("group_advantages")(rewards.detach().float().contiguous(), group_size, scale_rewards, float(eps), impl)
