"""Triton kernels for the O(N) part of the GRPO loss: advantages and per-token loss terms.

These run after the vocabulary sweep, on per-token fp32 vectors; their cost is a few
microseconds next to the sweeps over N x V logits. One program per group (advantages) or
per sequence (loss terms), so sequence-level importance weights need no extra launch.
"""
import torch
import triton
import triton.language as tl

SCALE_CODES = {"none": 0, "group": 1, "batch": 2}


# ----------------------------------------------------------------------------- kernels


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
    adv_ptr, cu_ptr,             # (S,) fp32, (S+1,) int32
    dlogp_ptr, kl_ptr,           # (N,) fp32 out: dLoss/dlogp, k3 KL (if HAS_REF)
    seq_loss_ptr, seq_low_ptr, seq_high_ptr,  # (S,) fp32 out: weighted loss, clip counts
    eps_low, eps_high, delta, beta, inv_norm,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, USE_KL: tl.constexpr,
    HAS_DELTA: tl.constexpr, SEQ_LEVEL: tl.constexpr, PER_SEQ_MEAN: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Loss terms of one sequence, following TRL's GRPOTrainer._compute_loss.

    coef_1 = exp(logp - old) (token) or exp(masked mean of logp - old) (sequence),
    coef_2 = clamp(coef_1, 1 - eps_low, 1 + eps_high), coef_1 capped at delta if given,
    loss_t = -min(coef_1 A, coef_2 A) + beta * k3, weighted by w = inv_norm / n (grpo) or
    inv_norm. The gradient follows torch's conventions: clamp passes gradient on its closed
    interval, min splits it evenly on ties (so on-policy, coef = 1, it is -A exactly).
    For both importance levels dLoss/dlogp_t = w * dsurr/dcoef_1 * coef_1 (+ KL part): at
    sequence level each of the n tokens of a sequence holds 1/n of the mean's gradient and
    the n equal weights add back to w * n.
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

    seq_log_ratio = tl.zeros((), tl.float32)
    if SEQ_LEVEL and HAS_OLD:
        acc = tl.zeros((BLOCK_T,), tl.float32)
        for off in range(start, end, BLOCK_T):
            mask = off + cols < end
            lp = tl.load(logp_ptr + off + cols, mask=mask, other=0.0)
            old = tl.load(old_ptr + off + cols, mask=mask, other=0.0)
            acc += lp - old
        seq_log_ratio = tl.sum(acc, axis=0) / n

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
        coef_raw = tl.exp(log_ratio)
        coef_2 = tl.minimum(tl.maximum(coef_raw, 1.0 - eps_low), 1.0 + eps_high)
        d_coef_2 = tl.where((coef_raw >= 1.0 - eps_low) & (coef_raw <= 1.0 + eps_high), 1.0, 0.0)
        if HAS_DELTA:
            coef_1 = tl.minimum(coef_raw, delta)
            d_coef_1 = tl.where(coef_raw <= delta, 1.0, 0.0)
        else:
            coef_1 = coef_raw
            d_coef_1 = tl.full((BLOCK_T,), 1.0, tl.float32)
        u1 = coef_1 * adv
        u2 = coef_2 * adv
        d_pick = tl.where(u1 < u2, d_coef_1, tl.where(u2 < u1, d_coef_2, 0.5 * (d_coef_1 + d_coef_2)))
        tok_loss = -tl.minimum(u1, u2)
        dlogp = -adv * d_pick * coef_raw
        if HAS_REF:
            ref = tl.load(ref_ptr + off + cols, mask=mask, other=0.0)
            diff = ref - lp
            e = tl.exp(diff)
            kl = e - diff - 1.0
            tl.store(kl_ptr + off + cols, kl, mask=mask)
            if USE_KL:
                tok_loss += beta * kl
                dlogp += beta * (1.0 - e)
        tl.store(dlogp_ptr + off + cols, w * dlogp, mask=mask)
        loss_acc += tl.where(mask, tok_loss, 0.0)
        low_acc += tl.where(mask & (coef_1 < 1.0 - eps_low), 1.0, 0.0)
        high_acc += tl.where(mask & (coef_1 > 1.0 + eps_high), 1.0, 0.0)
    tl.store(seq_loss_ptr + seq, w * tl.sum(loss_acc, axis=0))
    # TRL counts a token as clipped only where the clip binds: low with A < 0, high with A > 0.
    tl.store(seq_low_ptr + seq, tl.where(adv < 0.0, tl.sum(low_acc, axis=0), 0.0))
    tl.store(seq_high_ptr + seq, tl.where(adv > 0.0, tl.sum(high_acc, axis=0), 0.0))


# ----------------------------------------------------------------------------- launchers


def group_advantages(rewards, group_size: int, scale_rewards: str, eps: float):
    """rewards: (S,) fp32, S a multiple of group_size. Returns (S,) fp32 advantages."""
    S = rewards.shape[0]
    adv = torch.empty_like(rewards)
    _group_advantages_kernel[(S // group_size,)](
        rewards, adv, S, group_size, eps, SCALE=SCALE_CODES[scale_rewards],
        BLOCK_G=triton.next_power_of_2(group_size), BLOCK_S=1024,
    )
    return adv


def grpo_terms(logp, old_logp, ref_logp, advantages, cu_seqlens, *, eps_low, eps_high, delta,
               beta, inv_norm, per_seq_mean, seq_level):
    """Per-token dLoss/dlogp and k3 KL, per-sequence loss and clip counts; see the kernel.

    logp, old_logp, ref_logp: (N,) fp32 (old/ref may be None). advantages: (S,) fp32.
    cu_seqlens: (S+1,) int32. Returns dlogp (N,), kl (N,) (empty without ref_logp),
    seq_loss (S,), seq_low (S,), seq_high (S,), all fp32.
    """
    N, S = logp.shape[0], advantages.shape[0]
    dlogp = torch.empty_like(logp)
    kl = torch.empty_like(logp) if ref_logp is not None else logp.new_empty(0)
    seq_stats = torch.empty(3, S, dtype=torch.float32, device=logp.device)
    if S > 0:
        _grpo_terms_kernel[(S,)](
            logp, old_logp if old_logp is not None else logp,
            ref_logp if ref_logp is not None else logp,
            advantages, cu_seqlens, dlogp, kl if ref_logp is not None else dlogp,
            seq_stats[0], seq_stats[1], seq_stats[2],
            eps_low, eps_high, delta if delta is not None else 0.0, beta, inv_norm,
            HAS_OLD=old_logp is not None, HAS_REF=ref_logp is not None,
            USE_KL=ref_logp is not None and beta != 0.0, HAS_DELTA=delta is not None,
            SEQ_LEVEL=seq_level, PER_SEQ_MEAN=per_seq_mean, BLOCK_T=256,
        )
    return dlogp, kl, seq_stats[0], seq_stats[1], seq_stats[2]
