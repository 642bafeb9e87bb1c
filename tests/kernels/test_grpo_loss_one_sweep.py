"""The token-level loss in one sweep (logits.grpo_loss_one_sweep, Triton through the interpreter): the
same results as the two-sweep path and the float64 reference, in both layouts, for any
upstream gradient. (test_grpo_loss.py's matrix runs it too: grpo_loss takes it for every
token-level Triton call that needs a gradient.)"""
import pytest
import torch
from test_grpo_loss import DTYPE_EPS, LENS, assert_close_scaled, make_case, reference
from trl_reference import pack_to_padded

from r1vl_kernels import grpo_loss
from r1vl_kernels.registry import op


def _two_sweeps(logits, target, cu, adv, old, ref, grad_scale, **kw):
    """The two-sweep op on the same inputs (what grpo_loss runs at the sequence level)."""
    leaf = logits.clone().requires_grad_()
    out = op("grpo_loss_fwd")(
        logits=leaf, target_ids=target, flat_idx=None, cu_seqlens=cu, advantages=adv, old_logp=old, ref_logp=ref,
        policy_weight=None, sampling_logp=None, vespo_log_offset=None, temperature=kw["temperature"],
        beta=kw["beta"], eps_low=0.2, eps_high=0.28, delta=kw["delta"], inv_norm=1.0 / (len(cu) - 1),
        per_seq_mean=True, seq_level=False, policy="clip", sapo_tau_pos=1.0, sapo_tau_neg=1.05,
        off_policy_threshold=None, bias_correction_kl=False, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
        vespo_k_neg=3.0, vespo_lambda_neg=2.0, with_entropy=True, inplace_backward=False, impl="triton")
    (out[0] * grad_scale).backward()
    return out, leaf.grad


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("grad_scale", (1.0, -2.5))
def test_one_sweep_matches_two_sweeps_and_float64(dtype, grad_scale, seed):
    logits, target, cu, adv, old, ref = make_case(seed, dtype, 0.8)
    adv[3] = 0.0  # zero advantage, with KL: the gradient is the KL's only
    kw = dict(temperature=0.8, beta=0.04, delta=1.5)
    leaf = logits.clone().requires_grad_()
    out = grpo_loss(leaf, target, cu, adv, old, ref, epsilon_low=0.2, epsilon_high=0.28, return_entropy=True,
                    impl="triton", **kw)
    (out.loss * grad_scale).backward()

    two, two_grad = _two_sweeps(logits, target, cu, adv, old, ref, grad_scale, **kw)
    torch.testing.assert_close(out.loss, two[0], rtol=1e-6, atol=1e-7)
    for name, a, b in (("logp", out.logp, two[1]), ("kl", out.kl, two[4]), ("entropy", out.entropy, two[5])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert_close_scaled(leaf.grad, two_grad.double(), dtype, "dlogits vs two sweeps", seed)

    expected, expected_grad, _ = reference(logits, target, cu, adv, old, ref, epsilon_low=0.2, epsilon_high=0.28,
                                           loss_type="grpo", importance_sampling_level="token",
                                           max_completion_length=max(LENS), **kw)
    torch.testing.assert_close(out.loss.double(), expected.loss.detach(), rtol=1e-5, atol=1e-7)
    if grad_scale == 1.0:
        assert_close_scaled(leaf.grad, expected_grad, dtype, "dlogits vs float64", seed)
    else:
        # Stored in the logits' dtype in forward, scaled in backward: rounded twice (the
        # interpreter's first rounding truncates: up to 1 ulp, then 1/2 ulp).
        exact = expected_grad * grad_scale
        err = (leaf.grad.double() - exact).abs()
        tol = 3 * DTYPE_EPS[dtype] * exact.abs() + 1e-5 * exact.abs().max()
        assert bool((err <= tol).all()), f"dlogits vs float64: max error {err.max().item():.3e} (seed={seed})"


def test_one_sweep_padded_view(seed):
    """(B, L+1, V) logits read through [:, :-1]: zero gradient rows off the mask and on the
    last position, the packed results on the mask."""
    logits, target, cu, adv, old, ref = make_case(seed, torch.float32, 1.0)
    logits_pad, mask = pack_to_padded(logits, cu)
    full = torch.cat([logits_pad, logits_pad[:, :1]], dim=1).requires_grad_()
    pad = lambda x: pack_to_padded(x, cu, fill=0)[0]  # noqa: E731
    out = grpo_loss(full[:, :-1], pad(target), advantages=adv, old_logp=pad(old), ref_logp=pad(ref),
                    completion_mask=mask, beta=0.04, loss_type="bnpo", impl="triton")
    out.loss.backward()
    leaf = logits.clone().requires_grad_()
    packed = grpo_loss(leaf, target, cu, adv, old, ref, beta=0.04, loss_type="bnpo", impl="triton")
    packed.loss.backward()
    torch.testing.assert_close(out.loss, packed.loss)
    torch.testing.assert_close(full.grad[:, :-1][mask.bool()], leaf.grad)
    assert bool((full.grad[:, :-1][~mask.bool()] == 0).all()) and bool((full.grad[:, -1] == 0).all())


def test_without_gradient_the_loss_is_the_same(seed):
    """No gradient wanted (no_grad, or logits that do not require one): the two-sweep
    forward runs, with the same values."""
    logits, target, cu, adv, old, ref = make_case(seed, torch.float32, 1.0)
    with_grad = grpo_loss(logits.clone().requires_grad_(), target, cu, adv, old, ref, beta=0.04, impl="triton")
    with torch.no_grad():
        without = grpo_loss(logits, target, cu, adv, old, ref, beta=0.04, impl="triton")
    torch.testing.assert_close(with_grad.loss.detach(), without.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(with_grad.logp, without.logp, rtol=0, atol=1e-6)
