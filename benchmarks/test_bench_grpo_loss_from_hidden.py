"""GRPO loss from hidden states (lm_head fused): r1vl's grpo_loss_from_hidden against the lm_head
matmul followed by the eager PyTorch loss as TRL computes it, the same under torch.compile,
lm_head + r1vl's grpo_loss (the logits materialized once), and Liger-Kernel's
LigerFusedLinearGRPOLoss.

    pytest benchmarks/test_bench_grpo_loss_from_hidden.py --benchmark-only          # the GPU cases skip without one
    pytest benchmarks/test_bench_grpo_loss_from_hidden.py --benchmark-only -k cpu   # one small shape on the CPU

One group per shape and pass ("grpo_loss_from_hidden cuda N=16384 H=3584 V=152064 bfloat16
fwd+bwd"). Providers:
  torch_eager             hidden @ weight.T, then trl_eager.trl_grpo_loss
  torch_compile           the same, the loss under torch.compile (compiled in the warm-up rounds)
  r1vl_lm_head+grpo_loss  hidden @ weight.T, then r1vl's grpo_loss on the packed logits
  r1vl_fused              grpo_loss_from_hidden: on a GPU the Triton kernels (logit tiles in
                          on-chip memory, recomputed in backward), on the CPU its PyTorch path
                          (token x vocabulary chunks)
  liger_fused_linear      LigerFusedLinearGRPOLoss (chunked torch, compiled on a GPU; it
                          computes the gradients in its forward, so its bwd is a hand-over)

The yardstick is the matmul work: forward 2NHV flops, backward with recomputed logits 6NHV
(dhidden, dweight and the recomputation), 8NHV for fwd+bwd, as a share of a plain matmul in the
same dtype measured in the same session (of_matmul_ceiling; the target for r1vl_fused fwd+bwd
is 0.75).
bytes_moved counts hidden and weight read (fwd), read and their gradients written (bwd), both
(fwd+bwd). r1vl_fused's backward holds one logits chunk of at most 512 MiB besides the
gradients (peak_mem_added_MB; target: at most 1.5 GB at N=16384, H=3584).
"""
import functools
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from _suite import PASSES, Work, device_marks, dtype_name
from trl_eager import trl_grpo_loss

from r1vl_kernels import grpo_loss, grpo_loss_from_hidden

SEQ_LEN = 1024
BETA = 0.04


@dataclass(frozen=True)
class Shape:
    device: str
    N: int  # completion tokens: N // SEQ_LEN sequences (one if N < SEQ_LEN)
    H: int
    V: int
    dtype: torch.dtype = torch.bfloat16

    def __str__(self):
        return f"{self.device} N={self.N} H={self.H} V={self.V} {dtype_name(self.dtype)}"

    @property
    def id(self):
        return str(self).replace(" ", "-").replace("=", "")


# Qwen2-VL-2B's and 7B's heads on a GPU. On the CPU one small shape (the CI mode: it keeps the
# suite working; the kernels' speed is measured on a GPU), a quarter of the old script's
# 1024 x 256 x 8192, whose 15 cases took 160 s of the CPU mode's 5-minute budget on two
# shared cores.
SHAPES = {s.id: s for s in [Shape("cpu", 512, 256, 4096)] + [
    Shape("cuda", N, H, V) for H, V in ((1536, 151936), (3584, 152064)) for N in (4096, 16384)]}


@functools.lru_cache(maxsize=1)  # one shape at a time: the cases run shape by shape
def inputs(shape: Shape) -> dict:
    device, N, H, V = shape.device, shape.N, shape.H, shape.V
    L = min(N, SEQ_LEN)
    B = N // L
    g = torch.Generator(device=device).manual_seed(0)
    old = -torch.rand(B, L, device=device, generator=g) * 10
    return dict(
        hidden=torch.randn(B, L, H, device=device, dtype=shape.dtype, generator=g),
        weight=(torch.randn(V, H, device=device, generator=g) * H**-0.5).to(shape.dtype),
        target=torch.randint(0, V, (B, L), device=device, generator=g),
        old=old, ref=old + 0.1 * torch.randn(B, L, device=device, generator=g),
        adv=torch.randn(B, device=device, generator=g), mask=torch.ones(B, L, device=device),
        cu=torch.arange(0, N + 1, L, device=device, dtype=torch.int32))


@pytest.fixture(scope="module", autouse=True)
def _free_inputs():
    yield
    inputs.cache_clear()


# ----------------------------------------------------------------------------- providers


@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable  # (x, hidden_leaf (B, L, H), weight_leaf (V, H), impl) -> callable returning the loss
    note: str = ""


def _lm_head_then_trl(loss_fn):
    return lambda x, h, w, impl: lambda: loss_fn(h @ w.t(), x["target"], x["mask"], x["adv"], x["old"], x["ref"],
                                                 beta=BETA)


def _packed(x):
    return x["target"].reshape(-1), x["cu"], x["adv"], x["old"].reshape(-1), x["ref"].reshape(-1)


def _lm_head_then_r1vl(x, h, w, impl):
    return lambda: grpo_loss(h.flatten(0, 1) @ w.t(), *_packed(x), beta=BETA, impl=impl).loss


def _r1vl_fused(x, h, w, impl):
    return lambda: grpo_loss_from_hidden(h.flatten(0, 1), w, *_packed(x), beta=BETA, impl=impl).loss


def _liger(x, h, w, impl):
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    loss = chunked.LigerFusedLinearGRPOLoss(beta=BETA, compiled=h.is_cuda, loss_type="grpo")
    return lambda: loss(h, w, x["target"], x["mask"], x["adv"], ref_per_token_logps=x["ref"],
                        old_per_token_logps=x["old"])[0]


PROVIDERS = {p.name: p for p in [
    Provider("torch_eager", _lm_head_then_trl(trl_grpo_loss)),
    Provider("torch_compile", _lm_head_then_trl(torch.compile(trl_grpo_loss, dynamic=False))),
    Provider("r1vl_lm_head+grpo_loss", _lm_head_then_r1vl),
    Provider("r1vl_fused", _r1vl_fused),
    Provider("liger_fused_linear", _liger, note="gradients computed in its forward; bwd is a hand-over"),
]}


def cases():
    """(shape id, pass, provider name): plain strings, so the JSON's params read."""
    for shape in SHAPES.values():
        for pass_ in PASSES:
            for name in PROVIDERS:
                yield pytest.param(shape.id, pass_, name, id=f"{shape.id}-{pass_}-{name}",
                                   marks=device_marks(shape.device))


# ----------------------------------------------------------------------------- the benchmark


@pytest.mark.parametrize("shape, pass_, provider", list(cases()))
def test_grpo_loss_from_hidden(benchmark, measure, shape, pass_, provider):
    shape, provider = SHAPES[shape], PROVIDERS[provider]
    x = inputs(shape)
    h = x["hidden"].detach().requires_grad_()  # leaves sharing the cached inputs' storage
    w = x["weight"].detach().requires_grad_()
    impl = "triton" if shape.device == "cuda" else "torch"
    loss_fn = provider.build(x, h, w, impl)

    benchmark.group = f"grpo_loss_from_hidden {shape} {pass_}"
    N, H, V = shape.N, shape.H, shape.V
    io_bytes = (N + V) * H * x["hidden"].element_size()  # hidden and weight, or their gradients
    work = Work(bytes={"fwd": 1, "bwd": 2, "fwd+bwd": 3}[pass_] * io_bytes,
                flops={"fwd": 2, "bwd": 6, "fwd+bwd": 8}[pass_] * N * H * V, dtype=shape.dtype)
    measure(pass_, loss_fn, [h, w], shape.device, work, provider=provider.name,
            impl=impl if provider.name.startswith("r1vl") else None, N=N, H=H, V=V, dtype=dtype_name(shape.dtype),
            level="token", loss_type="grpo", beta=BETA, note=provider.note or None)
