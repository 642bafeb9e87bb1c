"""grpo_loss against the independent float64 TRL-style reference, both implementations.

The Triton path runs through TRITON_INTERPRET=1 on CPU (set in tests/conftest.py).
"""
import itertools

import pytest
import torch
from trl_reference import advantages_like_trl, grpo_loss_like_trl, pack_to_padded, padded_to_packed

from r1vl_kernels import group_advantages, grpo_loss

IMPLS = ("torch", "triton")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IS_LEVELS = ("token", "sequence")
DTYPE_EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Lengths 1, uneven lengths, and an empty sequence; V = 131 is not a multiple of any block.
LENS = [1, 7, 3, 12, 0, 5, 1, 9]
V = 131


def make_case(seed, dtype, temperature, lens=LENS, vocab=V):
    """Packed logits (N, V) in `dtype`, targets, cu_seqlens, advantages, and old/ref log-probs
    near the current ones (so ratios fall on both sides of the clip range)."""
    g = torch.Generator().manual_seed(seed)
    N, S = sum(lens), len(lens)
    logits = (torch.randn(N, vocab, generator=g) * 2.5).to(dtype)
    target = torch.randint(0, vocab, (N,), generator=g)
    cu = torch.zeros(S + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    exact = torch.log_softmax(logits.double() / temperature, -1).gather(1, target[:, None]).squeeze(1)
    old = (exact + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)).float()
    ref = (exact + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(S, generator=g)
    return logits, target, cu, adv, old, ref


def reference(logits, target, cu, adv, old, ref, **kw):
    """The reference on the padded form of a packed case; returns it and its packed gradient."""
    logits_pad, mask = pack_to_padded(logits.double(), cu)
    target_pad, _ = pack_to_padded(target, cu, fill=0)
    old_pad = pack_to_padded(old, cu)[0] if old is not None else None
    ref_pad = pack_to_padded(ref, cu)[0] if ref is not None else None
    leaf = logits_pad.requires_grad_()
    out = grpo_loss_like_trl(leaf, target_pad, mask, adv, old_pad, ref_pad, **kw)
    out.loss.backward()
    return out, padded_to_packed(leaf.grad, mask), mask


def assert_close_scaled(actual, expected, dtype, what, seed, rel=1e-5):
    """Elementwise |actual - expected| <= 2 ulp(dtype) at |expected| + rel max|expected|:
    the error of storing the exact value in dtype (the interpreter truncates: up to 1 ulp),
    plus fp32 arithmetic."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    tol = 2 * DTYPE_EPS[dtype] * expected.abs() + rel * scale + 1e-12
    err = (actual - expected).abs()
    assert bool((err <= tol).all()), (
        f"{what}: max error {err.max().item():.3e} vs max |expected| {scale:.3e} (seed={seed})")


MATRIX = list(itertools.product(
    LOSS_TYPES, IS_LEVELS, (None, 1.5), (0.0, 0.04),
    (1.0, 0.7), (torch.float32, torch.bfloat16, torch.float16)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type,level,delta,beta,temperature,dtype", MATRIX)
def test_matches_trl_reference(impl, loss_type, level, delta, beta, temperature, dtype, seed):
    logits, target, cu, adv, old, ref = make_case(seed, dtype, temperature)
    kw = dict(temperature=temperature, beta=beta, epsilon_low=0.2, epsilon_high=0.28, delta=delta,
              loss_type=loss_type, importance_sampling_level=level)
    # dapo with an explicit global token count (as TRL passes it), the others with defaults.
    num_items = 77.0 if loss_type == "dapo" else None
    expected, expected_grad, mask = reference(
        logits, target, cu, adv, old, ref if beta else None, max_completion_length=max(LENS),
        num_items_in_batch=num_items, **kw)

    leaf = logits.clone().requires_grad_()
    out = grpo_loss(leaf, target, cu, adv, old, ref if beta else None, return_entropy=True,
                    num_items_in_batch=num_items, impl=impl, **kw)
    out.loss.backward()

    torch.testing.assert_close(out.loss.double(), expected.loss.detach(), rtol=1e-4, atol=1e-6,
                               msg=lambda m: f"loss (seed={seed}): {m}")
    torch.testing.assert_close(out.logp.double(), padded_to_packed(expected.logp, mask), rtol=0, atol=1e-4)
    torch.testing.assert_close(out.entropy.double(), padded_to_packed(expected.entropy, mask), rtol=0, atol=2e-4)
    if beta:
        torch.testing.assert_close(out.kl.double(), padded_to_packed(expected.kl, mask), rtol=1e-4, atol=1e-4)
    else:
        assert out.kl is None
    assert out.clip_low_frac.item() == pytest.approx(expected.clip_low_frac, abs=1e-6)
    assert out.clip_high_frac.item() == pytest.approx(expected.clip_high_frac, abs=1e-6)
    assert leaf.grad.dtype == dtype
    assert_close_scaled(leaf.grad, expected_grad, dtype, "dlogits", seed)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type,level", list(itertools.product(LOSS_TYPES, IS_LEVELS)))
def test_on_policy(impl, loss_type, level, seed):
    """old_logp=None means old = logp.detach(): ratio exactly 1, where TRL's min() sees a tie
    and splits its gradient; the result must match the reference and the explicit form."""
    logits, target, cu, adv, _, ref = make_case(seed, torch.float32, 1.0)
    kw = dict(temperature=1.0, beta=0.04, epsilon_low=0.2, epsilon_high=0.2, delta=None,
              loss_type=loss_type, importance_sampling_level=level)
    expected, expected_grad, _ = reference(logits, target, cu, adv, None, ref,
                                           max_completion_length=max(LENS), **kw)
    current = torch.log_softmax(logits, -1).gather(1, target[:, None]).squeeze(1)
    grads = []
    for old in (None, current):
        leaf = logits.clone().requires_grad_()
        out = grpo_loss(leaf, target, cu, adv, old, ref, impl=impl, **kw)
        out.loss.backward()
        grads.append(leaf.grad)
        assert out.clip_low_frac.item() == 0 and out.clip_high_frac.item() == 0
        torch.testing.assert_close(out.loss.double(), expected.loss.detach(), rtol=1e-5, atol=1e-7)
    assert_close_scaled(grads[0], expected_grad, torch.float32, "dlogits on-policy", seed)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale_rewards", ("group", "batch", "none"))
def test_rewards_path_equals_group_advantages_then_loss(impl, scale_rewards, seed):
    lens = [4, 1, 6, 2, 3, 5]  # S = 6: two groups of 3
    logits, target, cu, _, old, ref = make_case(seed, torch.float32, 1.0, lens=lens)
    rewards = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(seed)).float()
    adv = group_advantages(rewards, 3, scale_rewards, impl=impl)
    torch.testing.assert_close(adv.double(), advantages_like_trl(rewards, 3, scale_rewards), rtol=1e-5, atol=1e-6)

    results = []
    for kwargs in (dict(advantages=adv), dict(rewards=rewards, group_size=3, scale_rewards=scale_rewards)):
        leaf = logits.clone().requires_grad_()
        out = grpo_loss(leaf, target, cu, old_logp=old, ref_logp=ref, beta=0.04, impl=impl, **kwargs)
        out.loss.backward()
        results.append((out.loss, out.advantages, leaf.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", ("grpo", "dr_grpo", "dapo"))
def test_padded_layout_equals_packed(impl, loss_type, seed):
    """(B, L, V) logits read through a strided [:, :-1] view, with a completion mask that has
    holes and an all-zero row, give the packed results; gradients are zero off the mask."""
    g = torch.Generator().manual_seed(seed)
    B, L = 4, 9
    full = torch.randn(B, L + 1, V, generator=g, dtype=torch.float64).float()
    logits = full[:, :-1]  # not viewable as (B * L, V): read in place through row offsets
    target = torch.randint(0, V, (B, L), generator=g)
    mask = (torch.rand(B, L, generator=g) < 0.7).long()
    mask[2] = 0
    mask[0, 0] = 1
    old = torch.randn(B, L, generator=g) * 0.2 - 5
    ref = torch.randn(B, L, generator=g) * 0.2 - 5
    adv = torch.randn(B, generator=g)
    kw = dict(beta=0.04, loss_type=loss_type, max_completion_length=L, temperature=0.9, impl=impl,
              return_entropy=True)

    leaf_full = full.clone().requires_grad_()
    padded = grpo_loss(leaf_full[:, :-1], target, advantages=adv, old_logp=old, ref_logp=ref,
                       completion_mask=mask, **kw)
    padded.loss.backward()

    lens = mask.sum(1)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    m = mask.bool()
    leaf_packed = logits[m].clone().requires_grad_()
    packed = grpo_loss(leaf_packed, target[m], cu, adv, old[m], ref[m], **kw)
    packed.loss.backward()

    torch.testing.assert_close(padded.loss, packed.loss, rtol=1e-6, atol=1e-8)
    for name in ("logp", "kl", "entropy"):
        torch.testing.assert_close(getattr(padded, name)[m], getattr(packed, name))
        assert bool((getattr(padded, name)[~m] == 0).all()), name
    grad = leaf_full.grad
    assert bool((grad[:, -1] == 0).all())
    torch.testing.assert_close(grad[:, :-1][m], leaf_packed.grad, rtol=1e-6, atol=1e-9)
    assert bool((grad[:, :-1][~m] == 0).all())


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_backward(impl, seed):
    """Same gradient, written over the logits; another autograd use of them fails loudly."""
    logits, target, cu, adv, old, ref = make_case(seed, torch.bfloat16, 1.0)
    kw = dict(beta=0.04, impl=impl)
    expected_leaf = logits.float().clone().requires_grad_()
    grpo_loss(expected_leaf.to(torch.bfloat16), target, cu, adv, old, ref, **kw).loss.backward()

    leaf = logits.float().requires_grad_()
    hidden = leaf.to(torch.bfloat16)  # a non-leaf, as logits out of an lm_head are
    out = grpo_loss(hidden, target, cu, adv, old, ref, inplace_backward=True, **kw)
    out.loss.backward()
    # The same gradient; under Triton another kernel computes it (the in-place option keeps
    # the two-sweep backward, the reference takes the one-sweep kernel), whose bf16 dlogits may
    # differ by one rounding step (seed 187696011: one element of 4978, one ulp).
    ulp = 2.0**-7 if impl == "triton" else 0.0
    torch.testing.assert_close(leaf.grad, expected_leaf.grad, rtol=ulp, atol=0)

    hidden = leaf.detach().to(torch.bfloat16).requires_grad_()
    squares = (hidden * hidden).sum()  # saves hidden for its own backward
    grpo_loss(hidden, target, cu, adv, old, ref, inplace_backward=True, **kw).loss.backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        squares.backward()


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_advantage_and_no_kl_gives_zero_gradient(impl, seed):
    logits, target, cu, adv, _, _ = make_case(seed, torch.float32, 1.0)
    leaf = logits.clone().requires_grad_()
    out = grpo_loss(leaf, target, cu, torch.zeros_like(adv), impl=impl)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert bool((leaf.grad == 0).all())


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_vocabulary_with_minus_inf(impl, seed):
    """Logits set to -inf (a masked vocabulary) give finite log-probs, entropies, gradients."""
    logits, target, cu, adv, old, _ = make_case(seed, torch.float32, 1.0)
    logits[:, : V // 2] = float("-inf")
    target = torch.randint(V // 2, V, target.shape)
    leaf = logits.clone().requires_grad_()
    out = grpo_loss(leaf, target, cu, adv, return_entropy=True, impl=impl)
    out.loss.backward()
    assert bool(torch.isfinite(out.logp).all() and torch.isfinite(out.entropy).all())
    assert bool((out.logp <= 0).all())
    expected, expected_grad, _ = reference(
        logits, target, cu, adv, None, None, temperature=1.0, beta=0.0, epsilon_low=0.2,
        epsilon_high=0.2, delta=None, loss_type="grpo", importance_sampling_level="token",
        max_completion_length=12)
    torch.testing.assert_close(out.loss.double(), expected.loss.detach(), rtol=1e-5, atol=1e-7)
    assert_close_scaled(leaf.grad, expected_grad, torch.float32, "dlogits", seed)
