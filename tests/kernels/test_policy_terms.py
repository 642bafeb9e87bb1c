"""The loss types and options TRL 1.16 added to GRPO (cispo, sapo, luspo; a per-token weight
of the policy term; the off-policy sequence mask; the bias-corrected KL), both
implementations, from logits and from hidden states, against the float64 TRL-style
reference."""
import itertools

import pytest
import test_grpo_loss_from_hidden as hidden_case
import torch
from test_grpo_loss import LENS, assert_close_scaled, make_case, reference

# autouse: the hidden-state path's chunks and tiles small enough to cross several of each
from test_grpo_loss_from_hidden import small_tiles  # noqa: F401
from trl_reference import pack_to_padded, padded_to_packed

from r1vl_kernels import grpo_loss, grpo_loss_from_hidden

IMPLS = ("torch", "triton")
NEW_LOSS_TYPES = ("cispo", "sapo", "luspo", "vespo")
OPTIONS = ("none", "weight", "off_policy_mask", "bias_correction_kl", "all")


def assert_loss_close(out, expected, adv, seed):
    """fp32 loss against the float64 one. cispo's and vespo's policy terms are A * logp, of
    either sign, and can cancel to a loss far smaller than the terms: fp32 sums carry an
    error relative to the terms' size, so the absolute tolerance scales with max |A logp|."""
    term_scale = max(1.0, float(adv.abs().max() * out.logp.abs().max()))
    torch.testing.assert_close(out.loss.double(), expected.loss.detach(), rtol=1e-4, atol=1e-6 * term_scale,
                               msg=lambda m: f"loss (seed={seed}): {m}")


def option_kwargs(option, seed, cu, old, loss_type=None):
    """Keyword arguments of one option on a packed case: policy_weight like TRL's vLLM
    importance ratio times its entropy mask (zeros included), an off-policy mask whose
    threshold drops some negative-advantage sequences and keeps others."""
    g = torch.Generator().manual_seed(seed + 1)
    N = int(cu[-1])
    kw = {}
    if option in ("weight", "all"):
        kw["policy_weight"] = torch.rand(N, generator=g) * 1.5 * (torch.rand(N, generator=g) > 0.25)
    if option in ("off_policy_mask", "all"):
        kw["off_policy_threshold"] = 0.02
        sampling = old + 0.2 * torch.randn(N, generator=g)
        sampling[N // 2] = float("nan")  # a token the sampler could not score
        kw["sampling_logp"] = sampling
    if option in ("bias_correction_kl", "all"):
        kw["bias_correction_kl"] = True
    if loss_type == "vespo" and option in ("weight", "all"):  # TRL: the summed log vLLM ratios
        kw["vespo_log_offset"] = torch.rand(cu.shape[0] - 1, generator=g) - 0.5
    return kw


def padded(kw, cu):
    """The option vectors in the reference's padded layout."""
    return {k: pack_to_padded(v, cu)[0] if isinstance(v, torch.Tensor) and k != "vespo_log_offset" else v
            for k, v in kw.items()}


CASES = [(lt, lv, op) for lt, lv, op in itertools.product(NEW_LOSS_TYPES + ("grpo",), ("token", "sequence"), OPTIONS)
         if not (lt == "grpo" and op == "none")]
# Every case eagerly; under the (slow) Triton interpreter every option alone for grpo, and
# none / all of them for the new loss types.
MATRIX = [("torch",) + case for case in CASES] + [
    ("triton",) + case for case in CASES if case[0] == "grpo" or case[2] in ("none", "all")]


@pytest.mark.parametrize("impl,loss_type,level,option", MATRIX)
def test_from_logits_matches_reference(impl, loss_type, level, option, seed):
    logits, target, cu, adv, old, ref = make_case(seed, torch.float32, 0.8)
    extra = option_kwargs(option, seed, cu, old, loss_type)
    kw = dict(temperature=0.8, beta=0.04, epsilon_low=0.2, epsilon_high=1.3 if loss_type == "cispo" else 0.28,
              delta=None, loss_type=loss_type, importance_sampling_level=level,
              sapo_temperature_pos=1.0, sapo_temperature_neg=1.05)
    num_items = 61.0 if loss_type in ("cispo", "vespo") else None
    expected, expected_grad, mask = reference(logits, target, cu, adv, old, ref, max_completion_length=max(LENS),
                                              num_items_in_batch=num_items, **kw, **padded(extra, cu))
    leaf = logits.clone().requires_grad_()
    out = grpo_loss(leaf, target, cu, adv, old, ref, num_items_in_batch=num_items, impl=impl, **kw, **extra)
    out.loss.backward()
    assert_loss_close(out, expected, adv, seed)
    torch.testing.assert_close(out.kl.double(), padded_to_packed(expected.kl, mask), rtol=1e-4, atol=1e-5)
    assert out.clip_low_frac.item() == pytest.approx(expected.clip_low_frac, abs=1e-6)
    assert out.clip_high_frac.item() == pytest.approx(expected.clip_high_frac, abs=1e-6)
    assert_close_scaled(leaf.grad, expected_grad, torch.float32, "dlogits", seed)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type,level", list(itertools.product(NEW_LOSS_TYPES, ("token", "sequence"))))
def test_on_policy_new_loss_types(impl, loss_type, level, seed):
    """old_logp None (ratio 1, gradient still through the ratio) with every option on."""
    logits, target, cu, adv, _, ref = make_case(seed, torch.float32, 1.0)
    extra = option_kwargs("all", seed, cu, torch.zeros(int(cu[-1])), loss_type)
    kw = dict(beta=0.04, epsilon_high=5.0 if loss_type == "cispo" else 0.28, loss_type=loss_type,
              importance_sampling_level=level, temperature=1.0, epsilon_low=0.2, delta=None)
    expected, expected_grad, _ = reference(logits, target, cu, adv, None, ref, max_completion_length=max(LENS),
                                           **kw, **padded(extra, cu))
    leaf = logits.clone().requires_grad_()
    out = grpo_loss(leaf, target, cu, adv, None, ref, impl=impl, **kw, **extra)
    out.loss.backward()
    assert_loss_close(out, expected, adv, seed)
    assert_close_scaled(leaf.grad, expected_grad, torch.float32, "dlogits", seed)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type,level,dtype", [
    ("cispo", "token", torch.float32), ("sapo", "sequence", torch.bfloat16),
    ("luspo", "sequence", torch.float32), ("vespo", "token", torch.float32), ("grpo", "token", torch.bfloat16)])
def test_from_hidden_matches_reference(impl, loss_type, level, dtype, seed):
    hidden, weight, bias, target, cu, adv, old, ref = hidden_case.make_case(seed, dtype, 0.9)
    extra = option_kwargs("all", seed, cu, old, loss_type)
    kw = dict(temperature=0.9, beta=0.04, epsilon_low=0.2, epsilon_high=2.0 if loss_type == "cispo" else 0.28,
              delta=None, loss_type=loss_type, importance_sampling_level=level)
    expected, expected_grads = hidden_case.reference_grads(
        hidden, weight, bias, target, cu, adv, old, ref, max_completion_length=max(hidden_case.LENS),
        **kw, **padded(extra, cu))
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    out = grpo_loss_from_hidden(leaves[0], leaves[1], target, cu, adv, old, ref, bias=leaves[2], impl=impl,
                                **kw, **extra)
    out.loss.backward()
    assert_loss_close(out, expected, adv, seed)
    # fp32 matmuls summed over the vocabulary (dhidden) or the tokens (dweight): their rounding
    # follows the summands, not the result (R1VL_TEST_SEED=1494177618: vespo's dhidden is off by
    # 1.2e-5 of its largest entry on the torch path). In half precision the Triton backward's
    # logits chunks come back rounded to bf16, as cuBLAS returns them (emulated on the CPU), each
    # logit by up to 2**-8 of itself: the gradients' error scales with max |logit| / T, as in
    # test_grpo_loss_from_hidden (test_hidden_half_backward.py bounds it element by element).
    rel = 3e-5
    if dtype != torch.float32 and impl == "triton":
        logit_max = (hidden.double() @ weight.double().t() + bias.double()).abs().max().item()
        rel = 2 * 2.0**-8 * logit_max / kw["temperature"]
    for name, leaf, grad in zip(("dhidden", "dweight", "dbias"), leaves, expected_grads):
        assert_close_scaled(leaf.grad, grad, dtype, name, seed, rel=rel)


@pytest.mark.parametrize("change,match", [
    (dict(loss_type="ppo"), "loss_type"),
    (dict(vespo_log_offset=torch.zeros(1)), "vespo_log_offset"),
    (dict(loss_type="cispo", epsilon_high=0.0), "epsilon_high"),
    (dict(loss_type="sapo", sapo_temperature_neg=0.0), "sapo_temperature_neg"),
    (dict(sampling_logp=torch.zeros(LENS[1])), "off_policy_threshold"),
    (dict(policy_weight=torch.ones(3)), "policy_weight"),
    (dict(off_policy_threshold="0.1"), "off_policy_threshold"),
])
def test_bad_options_are_named(change, match):
    lens = [LENS[1]]
    logits, target, cu, adv, old, _ = make_case(0, torch.float32, 1.0, lens=lens)
    with pytest.raises(ValueError, match=match):
        grpo_loss(logits, target, cu, adv, old, **change)
