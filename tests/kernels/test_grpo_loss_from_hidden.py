"""grpo_loss_from_hidden against a float64 reference that materializes the logits, for
both implementations (the Triton path through TRITON_INTERPRET=1), and against
lm_head + grpo_loss; the eager path's memory on a shape whose logits would need 2 GB."""
import itertools
import subprocess
import sys

import pytest
import torch
from test_grpo_loss import IS_LEVELS, LOSS_TYPES, assert_close_scaled
from trl_reference import grpo_loss_like_trl, pack_to_padded

from r1vl_kernels import grpo_loss, grpo_loss_from_hidden, token_logprobs_from_hidden

IMPLS = ("torch", "triton")
LENS = [1, 6, 0, 13, 2, 9, 4]   # N = 35: not a multiple of any tile
H, V = 21, 83                   # odd, not multiples of any block


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles and chunks small enough that these shapes cross several of each."""
    from r1vl_kernels import reference as torch_reference
    monkeypatch.setattr(torch_reference, "TOKEN_CHUNK", 8)
    monkeypatch.setattr(torch_reference, "VOCAB_CHUNK", 29)
    if not torch.cuda.is_available():
        from r1vl_kernels import hidden as hidden_module
        for name, value in (("BLOCK_N", 16), ("BLOCK_V", 32), ("BLOCK_H", 16), ("TARGET_PROGRAMS", 6),
                            ("CHUNK_BYTES", 6 * V * 4 + 100)):  # backward chunks of 6 tokens
            monkeypatch.setattr(hidden_module, name, value)


def make_case(seed, dtype, temperature, lens=LENS):
    g = torch.Generator().manual_seed(seed)
    N, S = sum(lens), len(lens)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.6).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.3).to(dtype)
    target = torch.randint(0, V, (N,), generator=g)
    cu = torch.zeros(S + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    logits = hidden.double() @ weight.double().t() + bias.double()
    exact = torch.log_softmax(logits / temperature, -1).gather(1, target[:, None]).squeeze(1)
    old = (exact + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)).float()
    ref = (exact + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)).float()
    return hidden, weight, bias, target, cu, torch.randn(S, generator=g), old, ref


def reference_grads(hidden, weight, bias, target, cu, adv, old, ref, **kw):
    """Loss and (dhidden, dweight, dbias) in float64 through materialized logits."""
    leaves = [x.double().requires_grad_() for x in (hidden, weight, bias)]
    logits = leaves[0] @ leaves[1].t() + leaves[2]
    logits_pad, mask = pack_to_padded(logits, cu)
    pad = lambda x: pack_to_padded(x, cu)[0] if x is not None else None  # noqa: E731
    out = grpo_loss_like_trl(logits_pad, pad(target), mask, adv, pad(old), pad(ref), **kw)
    out.loss.backward()
    return out, [leaf.grad for leaf in leaves]


MATRIX = list(itertools.product(LOSS_TYPES, IS_LEVELS, (None, 1.5), (0.0, 0.04), (1.0, 0.7),
                                (torch.float32, torch.bfloat16)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type,level,delta,beta,temperature,dtype", MATRIX)
def test_matches_float64_reference(impl, loss_type, level, delta, beta, temperature, dtype, seed):
    hidden, weight, bias, target, cu, adv, old, ref = make_case(seed, dtype, temperature)
    kw = dict(temperature=temperature, beta=beta, epsilon_low=0.2, epsilon_high=0.28, delta=delta,
              loss_type=loss_type, importance_sampling_level=level)
    expected, expected_grads = reference_grads(hidden, weight, bias, target, cu, adv, old,
                                               ref if beta else None, max_completion_length=max(LENS), **kw)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    out = grpo_loss_from_hidden(leaves[0], leaves[1], target, cu, adv, old, ref if beta else None,
                                bias=leaves[2], impl=impl, **kw)
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), expected.loss.detach(), rtol=1e-4, atol=1e-6,
                               msg=lambda m: f"loss (seed={seed}): {m}")
    # Half precision: the backward's logits chunks are rounded to bf16 as cuBLAS returns them
    # (emulated on CPU), each logit by up to 2**-8 of itself, so the gradients' error scales
    # with max |logit| / T. test_hidden_half_backward.py bounds it element by element.
    logit_max = (hidden.double() @ weight.double().t() + bias.double()).abs().max().item()
    rel = 1e-5 if dtype == torch.float32 else 2 * 2.0**-8 * logit_max / temperature
    for name, leaf, grad in zip(("dhidden", "dweight", "dbias"), leaves, expected_grads):
        assert leaf.grad.dtype == dtype
        assert_close_scaled(leaf.grad, grad, dtype, name, seed, rel=rel)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("zero", ("some", "all"))
def test_tokens_without_gradient(impl, zero, seed):
    """Zero-advantage sequences without KL have zero gradient rows: the chunked backward
    leaves their tokens out (and does nothing when no token has a gradient); the result is
    still the reference's, in every row."""
    hidden, weight, bias, target, cu, adv, old, ref = make_case(seed, torch.float32, 0.9)
    adv[[0, 3, 4]] = 0.0
    if zero == "all":
        adv.zero_()
    kw = dict(temperature=0.9, beta=0.0, epsilon_low=0.2, epsilon_high=0.28, delta=None, loss_type="bnpo",
              importance_sampling_level="token")
    _, expected_grads = reference_grads(hidden, weight, bias, target, cu, adv, old, None,
                                        max_completion_length=max(LENS), **kw)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    out = grpo_loss_from_hidden(leaves[0], leaves[1], target, cu, adv, old, bias=leaves[2], impl=impl, **kw)
    out.loss.backward()
    for name, leaf, grad in zip(("dhidden", "dweight", "dbias"), leaves, expected_grads):
        assert_close_scaled(leaf.grad, grad, torch.float32, name, seed)
    assert bool((leaves[0].grad[: LENS[0]] == 0).all())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_equals_lm_head_then_grpo_loss(impl, dtype, seed):
    """Same outputs and gradients as materializing logits = hidden @ weight^T + bias (in
    fp32, so that both sides see the same logits) and calling grpo_loss."""
    hidden, weight, bias, target, cu, adv, old, ref = make_case(seed, dtype, 0.9)
    kw = dict(temperature=0.9, beta=0.04, importance_sampling_level="sequence", return_entropy=True, impl=impl)
    results = []
    for fused in (True, False):
        leaves = [x.float().clone().requires_grad_() for x in (hidden, weight, bias)]
        if fused:
            out = grpo_loss_from_hidden(leaves[0], leaves[1], target, cu, adv, old, ref, bias=leaves[2], **kw)
        else:
            out = grpo_loss(leaves[0] @ leaves[1].t() + leaves[2], target, cu, adv, old, ref, **kw)
        out.loss.backward()
        results.append([out.loss, out.logp, out.kl, out.entropy] + [leaf.grad for leaf in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_padded_layout_and_token_logprobs(impl, seed):
    hidden, weight, bias, target, cu, adv, old, ref = make_case(seed, torch.float32, 1.0)
    hidden_pad, mask = pack_to_padded(hidden, cu)
    target_pad, _ = pack_to_padded(target, cu, fill=0)
    old_pad, ref_pad = pack_to_padded(old, cu)[0], pack_to_padded(ref, cu)[0]
    leaf_pad, leaf = hidden_pad.clone().requires_grad_(), hidden.clone().requires_grad_()
    padded = grpo_loss_from_hidden(leaf_pad, weight, target_pad, advantages=adv, old_logp=old_pad, ref_logp=ref_pad,
                                   completion_mask=mask, bias=bias, beta=0.04, impl=impl)
    packed = grpo_loss_from_hidden(leaf, weight, target, cu, adv, old, ref, bias=bias, beta=0.04, impl=impl)
    (padded.loss + packed.loss).backward()
    torch.testing.assert_close(padded.loss, packed.loss)
    torch.testing.assert_close(padded.logp[mask.bool()], packed.logp)
    torch.testing.assert_close(leaf_pad.grad[mask.bool()], leaf.grad)
    assert bool((leaf_pad.grad[~mask.bool()] == 0).all())

    logp, entropy = token_logprobs_from_hidden(hidden, weight, target, bias=bias, temperature=0.8,
                                               return_entropy=True, impl=impl)
    log_probs = torch.log_softmax((hidden.double() @ weight.double().t() + bias.double()) / 0.8, -1)
    torch.testing.assert_close(logp.double(), log_probs.gather(1, target[:, None]).squeeze(1), rtol=0, atol=2e-5)
    torch.testing.assert_close(entropy.double(), -(log_probs.exp() * log_probs).sum(-1), rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", ("aot_eager",))
def test_inside_torch_compile(backend, seed):
    hidden, weight, bias, target, cu, adv, _, ref = make_case(seed, torch.float32, 1.0)

    def step(hidden, weight):
        out = grpo_loss_from_hidden(torch.tanh(hidden), weight, target, cu, adv, ref_logp=ref, beta=0.04,
                                    impl="torch")
        return out.loss

    results = []
    for fn in (step, torch.compile(step, backend=backend, fullgraph=True)):
        w = weight.clone().requires_grad_()
        loss = fn(hidden, w)
        loss.backward()
        results.append((loss.detach(), w.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


def test_bad_input_is_named():
    hidden, weight, bias, target, cu, adv, _, _ = make_case(0, torch.float32, 1.0)
    cases = [
        (dict(weight=torch.randn(V, H + 1)), f"hidden has H={H} but weight is \\(V, H\\) with H={H + 1}"),
        (dict(weight=weight.double()), "weight must be float32, bfloat16 or float16"),
        (dict(weight=weight.to(torch.bfloat16)), "weight dtype torch.bfloat16 differs from hidden dtype"),
        (dict(bias=torch.randn(V + 1)), f"bias must be a tensor of shape \\({V},\\)"),
        (dict(target=torch.full_like(target, V)), f"target_ids must lie in \\[0, V={V}\\)"),
        (dict(hidden=torch.randn(2, 3, 4, H)), "hidden must be \\(N, H\\) packed or \\(B, L, H\\) padded"),
        (dict(cu=torch.tensor([0, 5], dtype=torch.int32), adv=torch.randn(1)), "cu_seqlens must end at N=35, the number of hidden rows"),
    ]
    for change, match in cases:
        args = dict(hidden=hidden, weight=weight, target=target, cu=cu, adv=adv, bias=bias) | change
        with pytest.raises(ValueError, match=match):
            grpo_loss_from_hidden(args["hidden"], args["weight"], args["target"], args["cu"], args["adv"],
                                  bias=args["bias"], impl="torch")


MEMORY_SCRIPT = """
import resource, torch
from r1vl_kernels import grpo_loss_from_hidden
torch.manual_seed(0)
N, V, H, S = 8192, 65536, 64, 16
hidden = torch.randn(N, H, requires_grad=True)
weight = (torch.randn(V, H) * 0.1).requires_grad_()
target = torch.randint(0, V, (N,))
cu = torch.arange(0, N + 1, N // S, dtype=torch.int32)
adv = torch.randn(S)
# Warm up allocator and libraries on a small case, then measure the big one.
grpo_loss_from_hidden(hidden[:64], weight[:512], target[:64] % 512, torch.tensor([0, 64], dtype=torch.int32),
                      adv[:1], impl="torch").loss.backward()
hidden.grad = weight.grad = None
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = grpo_loss_from_hidden(hidden, weight, target, cu, adv, impl="torch", return_entropy=True)
out.loss.backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) / 1024)
"""


def test_eager_path_never_holds_the_logits():
    """N x V fp32 logits here would be 2 GiB; the peak resident memory may grow by the
    gradients (dweight fp32 16 MiB plus its copy) and the chunks' working set only."""
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    growth_mib = float(result.stdout.strip().splitlines()[-1])
    print(f"peak resident growth: {growth_mib:.0f} MiB (materialized fp32 logits: 2048 MiB)")
    assert growth_mib < 300
