"""Checks that need a CUDA GPU: the compiled Triton kernels (not the interpreter) at real
shapes, against the eager torch implementation on the same device. Skipped without a GPU."""
import pytest
import torch

from r1vl_kernels import grpo_loss, token_logprobs

pytestmark = pytest.mark.gpu


def _case(N, V, S, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(N, V, device="cuda", generator=g) * 2).to(dtype)
    target = torch.randint(0, V, (N,), device="cuda", generator=g)
    cuts = torch.sort(torch.randint(0, N + 1, (S - 1,), device="cuda", generator=g)).values
    cu = torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), N)]).to(torch.int32)
    adv = torch.randn(S, device="cuda", generator=g)
    logp = token_logprobs(logits, target, impl="torch")
    old = logp + 0.2 * torch.randn(N, device="cuda", generator=g)
    ref = logp + 0.2 * torch.randn(N, device="cuda", generator=g)
    return logits, target, cu, adv, old, ref


@pytest.mark.parametrize("level", ("token", "sequence"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_triton_matches_torch_at_qwen_vocabulary(level, dtype, seed):
    logits, target, cu, adv, old, ref = _case(2053, 151936, 37, dtype, seed)
    results = {}
    for impl in ("torch", "triton"):
        leaf = logits.clone().requires_grad_()
        out = grpo_loss(leaf, target, cu, adv, old, ref, beta=0.04, temperature=0.9, delta=2.0,
                        importance_sampling_level=level, return_entropy=True, impl=impl)
        out.loss.backward()
        results[impl] = (out, leaf.grad)
    (a, ga), (b, gb) = results["triton"], results["torch"]
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.logp, b.logp, rtol=0, atol=1e-4)
    torch.testing.assert_close(a.entropy, b.entropy, rtol=0, atol=1e-3)
    eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-23
    err = (ga.float() - gb.float()).abs()
    tol = 2 * eps * gb.float().abs() + 1e-5 * gb.float().abs().max()
    assert bool((err <= tol).all()), f"max dlogits error {err.max().item():.3e} (seed={seed})"


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
    N, V = 14500, 151936
    assert N * V > 2**31
    logits, target, *_ = _case(N, V, 2, torch.bfloat16, seed)
    tail = slice(N - 64, N)
    expected = token_logprobs(logits[tail], target[tail], impl="torch")
    torch.testing.assert_close(token_logprobs(logits, target, impl="triton")[tail], expected, rtol=0, atol=1e-4)


def test_inplace_backward_saves_the_gradient_buffer(seed):
    logits, target, cu, adv, old, ref = _case(4096, 151936, 16, torch.bfloat16, seed)
    grads = []
    for inplace in (False, True):
        leaf = logits.float().requires_grad_()
        x = leaf.to(torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grpo_loss(x, target, cu, adv, old, ref, beta=0.04, inplace_backward=inplace, impl="triton").loss.backward()
        grads.append((leaf.grad, torch.cuda.max_memory_allocated() - base))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    assert grads[1][1] < grads[0][1] - 0.9 * logits.numel() * logits.element_size()


@pytest.mark.parametrize("level", ("token", "sequence"))
def test_from_hidden_triton_matches_torch_at_qwen2vl_2b_shapes(level, seed):
    """Qwen2-VL-2B's lm_head (V=151936, H=1536) in bf16: the fused kernels (tensor cores,
    bf16 dlogits tiles, fp32 atomics) against the chunked eager path on the same GPU."""
    from r1vl_kernels import grpo_loss_from_hidden
    g = torch.Generator(device="cuda").manual_seed(seed)
    N, H, V, S = 3001, 1536, 151936, 12
    hidden = torch.randn(N, H, device="cuda", generator=g).to(torch.bfloat16)
    weight = (torch.randn(V, H, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    target = torch.randint(0, V, (N,), device="cuda", generator=g)
    cu = torch.linspace(0, N, S + 1, device="cuda").round().to(torch.int32)
    adv = torch.randn(S, device="cuda", generator=g)
    ref = torch.full((N,), -11.0, device="cuda")
    results = {}
    for impl in ("torch", "triton"):
        leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
        out = grpo_loss_from_hidden(leaves[0], leaves[1], target, cu, adv, ref_logp=ref, beta=0.04,
                                    importance_sampling_level=level, impl=impl)
        out.loss.backward()
        results[impl] = (out, [leaf.grad.float() for leaf in leaves])
    (a, ga), (b, gb) = results["triton"], results["torch"]
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(a.logp, b.logp, rtol=0, atol=5e-3)
    for x, y in zip(ga, gb):
        # bf16 operands on the tensor cores: relative error of a few bf16 ulps of the largest.
        assert (x - y).abs().max() <= 2e-2 * y.abs().max(), f"(seed={seed})"
