"""The loss-from-hidden backward in bf16 with the GPU's numerics, against float64, for
confident tokens (p(target) up to 0.999) where a softmax that does not sum to 1 shows most.

On a GPU each backward chunk's logits come back from cuBLAS rounded to bf16; off a GPU
r1vl_kernels.hidden makes the same numbers in torch (fp32 sums, one rounding), and the vocabulary
kernel reads them through the interpreter. The bound on dlogits is the first-order error
that rounding implies: with x_j = hidden . weight_j + bias_j off by e_j <= u |x_j| (u = 2**-8),
p_i = softmax(x / T)_i moves by p_i (e_i - sum_j p_j e_j) / T, so
    |d dlogit_i| <= |c| / T**2 * p_i * ((1 - p_i) e_i + sum_{j != i} p_j e_j),
plus the storing of dlogits in bf16 (the interpreter truncates: 2u). For the target of a
confident token this is about (1 - p) |x| u: a stale lse instead makes it p |x| u, 1000 times
more at p = 0.999, and flips the gradient's sign.
"""
import pytest
import torch

from r1vl_kernels import hidden as hidden_module
from r1vl_kernels import reference

H, V = 19, 83                   # V not a multiple of the vocabulary block (64 in these tests)
LEVELS = (0.9, 0.99, 0.999)     # p(target), 4 tokens each
U = 2.0**-8                     # bf16 unit roundoff


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Backward chunks of one token: dweight and dbias sum over 12 chunks, and each chunk's
    logits are those of a one-token call (same matmul shape, same rounding), so the sums can
    be checked against the dlogits the one-token calls give."""
    monkeypatch.setattr(hidden_module, "CHUNK_BYTES", V * 2 + 10)
    monkeypatch.setattr(reference, "TOKEN_CHUNK", 1)
    monkeypatch.setattr(reference, "VOCAB_CHUNK", 29)


def confident_case(seed, temperature):
    """bf16 hidden (12, H), weight (V, H), bias (V,), distinct targets: each target's weight
    row is a long vector along a random direction, and its token's hidden row is pushed along
    that direction until p(target) reaches its level (bisection in float64, on the hidden
    rows as rounded to bf16)."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor(LEVELS, dtype=torch.float64).repeat_interleave(4)
    N = levels.numel()
    target = torch.randperm(V, generator=g)[:N]
    direction = torch.randn(N, H, generator=g, dtype=torch.float64)
    direction /= direction.norm(dim=1, keepdim=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7
    weight[target] = direction * 1.5 * 0.7 * H**0.5
    weight = weight.bfloat16()
    bias = (torch.randn(V, generator=g) * 0.5).bfloat16()
    base = torch.randn(N, H, generator=g, dtype=torch.float64)
    w64, b64 = weight.double(), bias.double()

    def p_target(h):
        h = h.bfloat16().double()
        return torch.softmax((h @ w64.t() + b64) / temperature, -1).gather(1, target[:, None]).squeeze(1)

    lo, hi = torch.full((N,), -20.0, dtype=torch.float64), torch.full((N,), 40.0, dtype=torch.float64)
    for _ in range(40):
        mid = (lo + hi) / 2
        below = p_target(base + mid[:, None] * direction) < levels
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    hidden = (base + hi[:, None] * direction).bfloat16()
    coef = torch.randn(N, generator=g)  # dLoss/dlogp per token, both signs
    return hidden, weight, bias, target, coef


def exact(hidden, weight, bias, target, coef, grad_out, temperature):
    """float64 logits x, probabilities p and dlogits = grad * coef / T * (onehot - p)."""
    x = hidden.double() @ weight.double().t() + bias.double()
    p = torch.softmax(x / temperature, -1)
    onehot = torch.nn.functional.one_hot(target, V).double()
    return x, p, (grad_out * coef.double() / temperature)[:, None] * (onehot - p)


def dlogits_bound(x, p, coef, grad_out, temperature, d):
    """The error of dlogits that bf16 logits and bf16 storage imply (module docstring), with a
    factor 2 for the second-order terms (|e| / T stays below 0.2 here)."""
    e = U * x.abs()
    spread = (p * e).sum(1, keepdim=True) - p * e       # sum_{j != i} p_j e_j
    first = (grad_out * coef.double().abs() / temperature**2)[:, None] * p * ((1 - p) * e + spread)
    return 2 * first + 2 * U * d.abs() + 1e-7 * d.abs().max()


def backward(impl, hidden, weight, bias, target, dlogp, grad_out, temperature):
    """(dhidden, dweight, dbias) of one backend's grad_from_hidden, the forward's lse given
    as the op gives it."""
    module = hidden_module if impl == "triton" else reference
    _, lse, _ = module.logprob_fwd_from_hidden(hidden, weight, bias, target, temperature, False)
    return module.grad_from_hidden(hidden, weight, bias, target, lse, dlogp, torch.tensor(grad_out), temperature)


@pytest.mark.parametrize("impl", ("triton", "torch"))
@pytest.mark.parametrize("temperature", (1.0, 1.2))
def test_confident_tokens_match_float64(impl, temperature, seed):
    hidden, weight, bias, target, coef = confident_case(seed, temperature)
    grad_out = 0.75
    x, p, d_exact = exact(hidden, weight, bias, target, coef, grad_out, temperature)
    p_t = p.gather(1, target[:, None]).squeeze(1)
    assert bool((p_t > 0.89).all()) and p_t.max() > 0.9985, p_t

    # dlogits one token at a time: with one token, dbias is its dlogits row (summed in fp32).
    rows = []
    for t in range(hidden.shape[0]):
        _, _, dbias = backward(impl, hidden[t:t + 1], weight, bias, target[t:t + 1], coef[t:t + 1], grad_out,
                               temperature)
        rows.append(dbias.double())
    d = torch.stack(rows)
    bound = dlogits_bound(x, p, coef, grad_out, temperature, d_exact)
    err = (d - d_exact).abs()
    on_target = torch.arange(hidden.shape[0]), target
    rel_target = (err[on_target] / d_exact[on_target].abs())
    print(f"{impl} T={temperature}: p(target) {p_t.min():.4f}-{p_t.max():.4f}, dlogit[target] relative error "
          f"median {rel_target.median():.3g} max {rel_target.max():.3g}, worst error/bound {(err / bound).max():.3g}")
    assert bool((torch.sign(d[on_target]) == torch.sign(d_exact[on_target])).all()), "dlogit[target] flipped sign"
    assert bool((err <= bound).all()), (
        f"dlogits off by up to {(err / bound).max():.3g}x the bf16 bound (seed={seed}); "
        f"dlogit[target] relative errors {rel_target.tolist()}")

    # All tokens at once, across chunks: dweight and dbias summed in fp32 (exact to fp32 given
    # the dlogits), dhidden one bf16 rounding of dlogits @ weight.
    dhidden, dweight, dbias = backward(impl, hidden, weight, bias, target, coef, grad_out, temperature)
    assert dweight.dtype == dbias.dtype == torch.float32
    assert dhidden.dtype == (torch.bfloat16 if impl == "triton" else torch.float32)  # the op casts it
    h64, w64 = hidden.double(), weight.double()
    fp32_sum = 2e-6 * (d.abs().t() @ h64.abs())
    assert bool(((dweight.double() - d.t() @ h64).abs() <= fp32_sum + 1e-12).all()), (
        "dweight is not the fp32 sum of the chunks' dlogits^T @ hidden")
    assert bool(((dbias.double() - d.sum(0)).abs() <= 2e-6 * d.abs().sum(0) + 1e-12).all())
    dh = d @ w64
    assert bool(((dhidden.double() - dh).abs() <= U * dh.abs() + 1e-6 * (d.abs() @ w64.abs()) + 1e-12).all())
    # And against float64 through the dlogits bound.
    assert bool(((dweight.double() - d_exact.t() @ h64).abs() <= bound.t() @ h64.abs() + fp32_sum + 1e-12).all())
    assert bool(((dhidden.double() - d_exact @ w64).abs()
                 <= bound @ w64.abs() + U * (d_exact @ w64).abs() + 1e-6 * (d.abs() @ w64.abs()) + 1e-12).all())
