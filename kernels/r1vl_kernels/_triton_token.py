"""dLoss/dlogp of one token under token-level importance sampling, as a Triton device
function: the per-token part of _triton_grpo's epilogue, for kernels that know a token's
log-prob and must act on its gradient at once (the one-sweep loss of _triton_vocab), and
the clipped policy term both use (clip_policy).

The formula and its conventions are _grpo_terms_kernel's (TRL's GRPOTrainer._compute_loss,
torch's subgradients: clamp passes gradient on its closed interval, min splits it evenly on
ties): with ratio = exp(logp - old), clipped = clamp(ratio, 1 - eps_low, 1 + eps_high),
ratio capped at delta if given,
    dLoss/dlogp = w * (-A * dmin/dratio * ratio + beta * (1 - exp(ref - logp)))
where w is the token's weight in the reduction (the loss type's 1 / normalizer, divided by
the sequence length for "grpo"). tests/kernels/test_grpo_loss_one_sweep.py checks that both
kernels agree.
"""
import triton
import triton.language as tl


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
    """lp, old, ref, adv, w: fp32 scalars (old / ref ignored without HAS_OLD / USE_KL)."""
    if HAS_OLD:
        ratio = tl.exp(lp - old)
    else:
        ratio = tl.exp(lp - lp)  # old = logp.detach(): ratio 1
    _, d_ratio, _ = clip_policy(ratio, adv, eps_low, eps_high, delta, HAS_DELTA)
    dlogp = d_ratio * ratio
    if USE_KL:
        dlogp += beta * (1.0 - tl.exp(ref - lp))
    return w * dlogp
