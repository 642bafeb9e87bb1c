"""dLoss/dlogp of one token under token-level importance sampling, as a Triton device
function: the per-token part of _triton_grpo's epilogue, for kernels that know a token's
log-prob and must act on its gradient at once (the one-sweep loss of _triton_vocab).

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
def token_dlogp(lp, old, ref, adv, w, eps_low, eps_high, delta, beta,
                HAS_OLD: tl.constexpr, USE_KL: tl.constexpr, HAS_DELTA: tl.constexpr):
    """lp, old, ref, adv, w: fp32 scalars (old / ref ignored without HAS_OLD / USE_KL)."""
    if HAS_OLD:
        coef_raw = tl.exp(lp - old)
    else:
        coef_raw = tl.exp(lp - lp)  # old = logp.detach(): ratio 1
    coef_2 = tl.minimum(tl.maximum(coef_raw, 1.0 - eps_low), 1.0 + eps_high)
    d_coef_2 = tl.where((coef_raw >= 1.0 - eps_low) & (coef_raw <= 1.0 + eps_high), 1.0, 0.0)
    if HAS_DELTA:
        coef_1 = tl.minimum(coef_raw, delta)
        d_coef_1 = tl.where(coef_raw <= delta, 1.0, 0.0)
    else:
        coef_1 = coef_raw
        d_coef_1 = tl.where(coef_raw == coef_raw, 1.0, 1.0)
    u1 = coef_1 * adv
    u2 = coef_2 * adv
    d_pick = tl.where(u1 < u2, d_coef_1, tl.where(u2 < u1, d_coef_2, 0.5 * (d_coef_1 + d_coef_2)))
    dlogp = -adv * d_pick * coef_raw
    if USE_KL:
        dlogp += beta * (1.0 - tl.exp(ref - lp))
    return w * dlogp
