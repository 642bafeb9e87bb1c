"""Checks that need a CUDA GPU: the compiled Triton kernels (not the interpreter) at real
shapes (V = 151936; H = 1536), every dtype and layout, against float64 references with
elementwise tolerances that one wrong row would break. Skipped without a GPU."""
import pytest
import torch
from test_grpo_loss import DTYPE_EPS, assert_close_scaled
from trl_reference import advantages_like_trl, grpo_loss_like_trl, pack_to_padded, padded_to_packed

from r1vl_kernels import group_advantages, grpo_loss, grpo_loss_from_hidden, token_logprobs

pytestmark = pytest.mark.gpu

V = 151936
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _sequences(N, S, g):
    cu = torch.linspace(0, N, S + 1, device="cuda").round().to(torch.int32)
    return cu, torch.randn(S, device="cuda", generator=g)


def _case(N, V, S, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(N, V, device="cuda", generator=g) * 2).to(dtype)
    target = torch.randint(0, V, (N,), device="cuda", generator=g)
    cu, adv = _sequences(N, S, g)
    logp = token_logprobs(logits, target, impl="torch")
    old = logp + _clip_safe_offsets(N, g)
    ref = logp + 0.2 * torch.randn(N, device="cuda", generator=g)
    return logits, target, cu, adv, old, ref


def _clip_safe_offsets(N, g):
    """old = logp + 0.5, 0.1, -0.05 or -0.5: ratios 0.61, 0.90, 1.05, 1.65, inside and outside
    the clip ranges used here ([0.8, 1.2], [0.8, 1.28]) and far from their edges, where an fp32
    log-prob error of 1e-6 could otherwise flip a token's clipping against the reference."""
    offsets = torch.tensor([0.5, 0.1, -0.05, -0.5], device="cuda")
    return offsets[torch.randint(0, 4, (N,), device="cuda", generator=g)]


def _reference_from_logits(logits, target, cu, adv, old, ref, **kw):
    """float64 loss, outputs and dLoss/dlogits (N, V) through the TRL-style reference."""
    logits_pad, mask = pack_to_padded(logits.double(), cu)
    pad = lambda x: pack_to_padded(x, cu)[0]  # noqa: E731
    leaf = logits_pad.requires_grad_()
    out = grpo_loss_like_trl(leaf, pad(target), mask, adv, pad(old), pad(ref),
                             max_completion_length=int(mask.shape[1]), **kw)
    out.loss.backward()
    return out, padded_to_packed(leaf.grad, mask), mask


@pytest.mark.parametrize("layout", ("packed", "padded"))
@pytest.mark.parametrize("level", ("token", "sequence"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_grpo_loss_matches_float64_at_qwen_vocabulary(dtype, level, layout, seed):
    N, S = 1031, 13
    logits, target, cu, adv, old, ref = _case(N, V, S, dtype, seed)
    kw = dict(beta=0.04, temperature=0.9, epsilon_low=0.2, epsilon_high=0.28, delta=2.0,
              importance_sampling_level=level, loss_type="grpo")
    expected, expected_grad, mask = _reference_from_logits(logits, target, cu, adv, old, ref, **kw)
    if layout == "packed":
        leaf = logits.clone().requires_grad_()
        out = grpo_loss(leaf, target, cu, adv, old, ref, return_entropy=True, impl="triton", **kw)
        out.loss.backward()
        grad, logp, entropy = leaf.grad, out.logp, out.entropy
    else:
        # (B, L + 1, V) logits read through the view [:, :-1], as a causal LM's output is.
        logits_pad = pack_to_padded(logits, cu)[0]
        full = torch.cat([logits_pad, logits_pad[:, :1]], dim=1).requires_grad_()
        pad = lambda x: pack_to_padded(x, cu)[0]  # noqa: E731
        out = grpo_loss(full[:, :-1], pad(target), advantages=adv, old_logp=pad(old), ref_logp=pad(ref),
                        completion_mask=mask, max_completion_length=int(mask.shape[1]), return_entropy=True,
                        impl="triton", **kw)
        out.loss.backward()
        assert bool((full.grad[:, -1] == 0).all()) and bool((full.grad[:, :-1][~mask.bool()] == 0).all())
        grad = padded_to_packed(full.grad[:, :-1], mask)
        logp, entropy = padded_to_packed(out.logp, mask), padded_to_packed(out.entropy, mask)
    torch.testing.assert_close(out.loss.double(), expected.loss.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logp.double(), padded_to_packed(expected.logp, mask), rtol=0, atol=2e-5)
    torch.testing.assert_close(entropy.double(), padded_to_packed(expected.entropy, mask), rtol=0, atol=1e-4)
    assert_close_scaled(grad, expected_grad, dtype, "dlogits", seed)


@pytest.mark.parametrize("scale_rewards", ("group", "batch", "none"))
def test_group_advantages_match_float64(scale_rewards, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rewards = torch.randint(0, 4, (4096,), device="cuda", generator=g).float() + 0.1 * torch.rand(
        4096, device="cuda", generator=g)
    adv = group_advantages(rewards, 16, scale_rewards, impl="triton")
    expected = advantages_like_trl(rewards.double(), 16, scale_rewards)
    torch.testing.assert_close(adv.double(), expected, rtol=1e-5, atol=1e-6)


def test_a_million_tokens_on_grid_axis_0(seed):
    """Liger #1294: tokens on grid axis 1 crash past 65,535. Here they are on axis 0."""
    logits, target, cu, adv, _, _ = _case(1 << 20, 128, 4096, torch.bfloat16, seed)
    leaf = logits.clone().requires_grad_()
    out = grpo_loss(leaf, target, cu, adv, impl="triton")
    out.loss.backward()
    expected = token_logprobs(logits, target, impl="torch")
    torch.testing.assert_close(out.logp, expected, rtol=0, atol=1e-4)
    assert bool(torch.isfinite(leaf.grad).all())


def test_offsets_past_two_to_the_31(seed):
    """N * V > 2**31 elements: row offsets must be 64-bit."""
    N = 14500
    assert N * V > 2**31
    logits, target, *_ = _case(N, V, 2, torch.bfloat16, seed)
    tail = slice(N - 64, N)
    expected = token_logprobs(logits[tail], target[tail], impl="torch")
    torch.testing.assert_close(token_logprobs(logits, target, impl="triton")[tail], expected, rtol=0, atol=1e-4)


def test_inplace_backward_saves_the_gradient_buffer(seed):
    logits, target, cu, adv, old, ref = _case(4096, V, 16, torch.bfloat16, seed)
    grads = []
    for inplace in (False, True):
        leaf = logits.float().requires_grad_()
        x = leaf.to(torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grpo_loss(x, target, cu, adv, old, ref, beta=0.04, inplace_backward=inplace, impl="triton").loss.backward()
        grads.append((leaf.grad, torch.cuda.max_memory_allocated() - base))
    # One sweep (out of place) against two sweeps (in place): the same bf16 gradient up to
    # one rounding (the softmax uses the lse in base 2 directly vs. stored in nats).
    assert_close_scaled(grads[1][0], grads[0][0].double(), torch.bfloat16, "in place vs one sweep", seed)
    assert grads[1][1] < grads[0][1] - 0.9 * logits.numel() * logits.element_size()


# ----------------------------------------------------------------------------- from hidden states


def _hidden_case(dtype, seed, N=1201, H=1536, S=7):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(N, H, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(V, H, device="cuda", generator=g) * 0.05).to(dtype)
    bias = (torch.randn(V, device="cuda", generator=g) * 0.5).to(dtype)
    target = torch.randint(0, V, (N,), device="cuda", generator=g)
    cu, adv = _sequences(N, S, g)
    adv[2] = 0.0  # a zero-advantage sequence: its tokens carry only the KL gradient
    logits = hidden.double() @ weight.double().t() + bias.double()
    exact = torch.log_softmax(logits, -1).gather(1, target[:, None]).squeeze(1)
    del logits
    old = (exact + _clip_safe_offsets(N, g).double()).float()
    ref = (exact + 0.2 * torch.randn(N, device="cuda", generator=g, dtype=torch.float64)).float()
    return hidden, weight, bias, target, cu, adv, old, ref


@pytest.mark.parametrize("level", ("token", "sequence"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_from_hidden_matches_float64_at_qwen2vl_2b_shapes(dtype, level, seed):
    """Qwen2-VL-2B's lm_head (V = 151936, H = 1536) with a bias: the fused forward and the
    chunked backward (tensor cores in half precision) against float64.

    The tolerance follows the backward's error model, elementwise: the logits chunk is
    rounded to the dtype (|dz| <= eps |z|, which moves p by p |dz| / T) and so is dlogits
    (eps |dlogits|); the forward's fp32 lse and log-probs are within LP_ERR (checked), which
    moves p and each token's coefficient; the matmuls add those errors weighted by |weight|
    and |hidden|. A wrong row of the weight or bias, or a wrong token, is far outside it."""
    T = 0.9
    hidden, weight, bias, target, cu, adv, old, ref = _hidden_case(dtype, seed)
    kw = dict(beta=0.04, temperature=T, epsilon_low=0.2, epsilon_high=0.28, importance_sampling_level=level)
    leaves64 = [x.double().requires_grad_() for x in (hidden, weight, bias)]
    z = leaves64[0] @ leaves64[1].t() + leaves64[2]
    z.retain_grad()
    z_pad, mask = pack_to_padded(z, cu)
    pad = lambda x: pack_to_padded(x, cu)[0]  # noqa: E731
    expected = grpo_loss_like_trl(z_pad, pad(target), mask, adv, pad(old), pad(ref), loss_type="grpo",
                                  delta=None, max_completion_length=int(mask.shape[1]), **kw)
    expected.loss.backward()

    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    out = grpo_loss_from_hidden(leaves[0], leaves[1], target, cu, adv, old, ref, bias=leaves[2], return_entropy=True,
                                impl="triton", **kw)
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), expected.loss.detach(), rtol=1e-5, atol=1e-7)
    LP_ERR = 2e-5
    exact_logp = padded_to_packed(expected.logp, mask)
    torch.testing.assert_close(out.logp.double(), exact_logp, rtol=0, atol=LP_ERR)
    torch.testing.assert_close(out.entropy.double(), padded_to_packed(expected.entropy, mask), rtol=0, atol=1e-4)

    with torch.no_grad():
        d = z.grad                                         # exact dLoss/dlogits (N, V)
        p = torch.softmax(z / T, -1)
        rows = torch.arange(len(target), device="cuda")
        coef = d[rows, target] / (1 - p[rows, target])     # d = coef * (onehot - p)
        eps = DTYPE_EPS[dtype]
        # Per-element error of the dlogits the matmuls see: the logit's error (rounded to the
        # dtype: eps |z|; fp32 accumulation: eps (|hidden| @ |weight|^T + |bias|)) moves p by
        # p dz / T, and dlogits is stored in the dtype (eps |dlogits|, fp32 arithmetic).
        z_mag = hidden.double().abs() @ weight.double().abs().t() + bias.double().abs()
        e_d = eps * (2 * d.abs() + coef.abs()[:, None] * p * (z.abs() + z_mag) / T)
        # A log-prob error LP_ERR moves p by p LP_ERR (the lse) and the token's coefficient by
        # at most LP_ERR (|coef| + 2 w beta max(e, |1 - e|) / T), e = exp(ref - logp), w its
        # weight in the loss (grpo: 1 / (S n_s)).
        lens = (cu[1:] - cu[:-1]).double()
        w = torch.repeat_interleave(1.0 / (len(lens) * lens), (cu[1:] - cu[:-1]).long())
        e = torch.exp(ref.double() - exact_logp)
        d_coef = LP_ERR * (coef.abs() + 2 * w * kw["beta"] * torch.maximum(e, (1 - e).abs()) / T)
        onehot = torch.zeros_like(p).scatter_(1, target[:, None], 1.0)
        e_d += LP_ERR * coef.abs()[:, None] * p + d_coef[:, None] * (p + onehot)
        bounds = (e_d @ weight.double().abs(), e_d.t() @ hidden.double().abs(), e_d.sum(0))
    for name, leaf, grad, bound in zip(("dhidden", "dweight", "dbias"), leaves, leaves64, bounds):
        actual, exact = leaf.grad.double(), grad.grad
        out_eps = DTYPE_EPS[dtype] if leaf.grad.dtype != torch.float32 else DTYPE_EPS[torch.float32]
        info = torch.finfo(leaf.grad.dtype)  # fp16's subnormal spacing, 6e-8, matters here
        tol = 2 * bound + 2 * out_eps * exact.abs() + 1e-7 * exact.abs().max() + info.tiny * info.eps
        err = (actual - exact).abs()
        assert bool((err <= tol).all()), (
            f"{name}: max error {err.max().item():.3e}, worst error/tolerance "
            f"{(err / tol).max().item():.2f} (seed={seed})")
