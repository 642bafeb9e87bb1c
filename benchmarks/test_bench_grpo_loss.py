"""GRPO loss from logits: r1vl's fused Triton kernel against the eager PyTorch loss as TRL
computes it, the same under torch.compile, and Liger-Kernel's triton_grpo_loss.

    pytest benchmarks/test_bench_grpo_loss.py --benchmark-only          # the GPU cases skip without one
    pytest benchmarks/test_bench_grpo_loss.py --benchmark-only -k cpu   # one small shape on the CPU

One group per shape, importance-sampling level and pass ("grpo_loss cuda N=16384 V=151936
bfloat16 token fwd+bwd"): its rows are the providers doing the same work. Providers:
  torch_eager    trl_eager.trl_grpo_loss on padded (B, L+1, V) logits, sliced [:, :-1]
  torch_compile  the same under torch.compile (compiled in the warm-up rounds)
  r1vl           grpo_loss on packed (N, V) logits; on a GPU the Triton kernels (token level:
                 forward and backward in one sweep, dlogits written in forward), on the CPU
                 its PyTorch path (impl="torch": the Triton kernels run there only through the
                 interpreter, whose times mean nothing)
  r1vl_inplace   two sweeps, dlogits written over the logits (GPU)
  r1vl_padded    grpo_loss reading the strided [:, :-1] view of the padded logits (GPU)
  liger, liger_inplace   Liger-Kernel's triton_grpo_loss (GPU; skipped without liger-kernel)

The yardstick is the two-pass design's traffic: the forward reads the logits, the backward
reads them and writes their gradient, fwd+bwd does both (3x the logits' bytes; shared/docs
KERNELS.md's HBM floor). r1vl's one-sweep kernel does its reading and writing in the forward
and hands dlogits over in the backward, so compare it on fwd+bwd, where it may pass the floor
(of_hbm_floor > 1).
"""
import functools
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from _suite import PASSES, Work, device_marks, dtype_name
from trl_eager import trl_grpo_loss

from r1vl_kernels import grpo_loss

SEQ_LEN = 1024  # tokens per sequence in the padded layouts of the baselines
BETA = 0.04


@dataclass(frozen=True)
class Shape:
    device: str
    N: int  # completion tokens: N // SEQ_LEN sequences (one if N < SEQ_LEN)
    V: int
    dtype: torch.dtype = torch.bfloat16
    levels: tuple = ("token",)  # importance-sampling levels benchmarked at this shape

    def __str__(self):
        return f"{self.device} N={self.N} V={self.V} {dtype_name(self.dtype)}"

    @property
    def id(self):
        return str(self).replace(" ", "-").replace("=", "")


# The scripts' GPU sweep (Llama's and Qwen2's vocabularies), sequence-level ratios (GSPO) at
# the reference shape of KERNELS.md. On the CPU one small shape, both levels (the CI mode: it
# keeps the suite working; the kernels' speed is measured on a GPU).
SHAPES = {s.id: s for s in [Shape("cpu", 1024, 4096, levels=("token", "sequence"))] + [
    Shape("cuda", N, V, levels=("token", "sequence") if (N, V) == (16384, 151936) else ("token",))
    for N in (4096, 16384, 65536) for V in (32000, 151936)]}


@functools.lru_cache(maxsize=1)  # one shape at a time: the cases run shape by shape
def inputs(shape: Shape) -> dict:
    device, N, V = shape.device, shape.N, shape.V
    L = min(N, SEQ_LEN)
    B = N // L
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(B, L + 1, V, device=device, dtype=shape.dtype, generator=g)  # +1: Liger's layout
    target = torch.randint(0, V, (B, L), device=device, generator=g)
    old = -torch.rand(B, L, device=device, generator=g) * 10
    return dict(logits=logits, target=target, old=old, ref=old + 0.1 * torch.randn(B, L, device=device, generator=g),
                adv=torch.randn(B, device=device, generator=g), mask=torch.ones(B, L, device=device),
                cu=torch.arange(0, N + 1, L, device=device, dtype=torch.int32))


@pytest.fixture(scope="module", autouse=True)
def _free_inputs():
    yield
    inputs.cache_clear()  # the last shape's logits would stay for the rest of the session


# ----------------------------------------------------------------------------- providers


@dataclass(frozen=True)
class Provider:
    name: str
    packed: bool           # (N, V) contiguous logits; else the padded (B, L+1, V) tensor
    build: Callable        # (x, logits_leaf, level, impl) -> callable returning the scalar loss
    inplace: bool = False  # backward overwrites the logits with their gradient
    gpu_only: bool = False


def _trl(loss_fn):
    return lambda x, leaf, level, impl: lambda: loss_fn(
        leaf[:, :-1], x["target"], x["mask"], x["adv"], x["old"], x["ref"], beta=BETA,
        importance_sampling_level=level)


def _r1vl(inplace=False):
    return lambda x, leaf, level, impl: lambda: grpo_loss(
        leaf, x["target"].reshape(-1), x["cu"], x["adv"], x["old"].reshape(-1), x["ref"].reshape(-1), beta=BETA,
        importance_sampling_level=level, inplace_backward=inplace, impl=impl).loss


def _r1vl_padded(x, leaf, level, impl):
    return lambda: grpo_loss(leaf[:, :-1], x["target"], advantages=x["adv"], old_logp=x["old"], ref_logp=x["ref"],
                             completion_mask=x["mask"], beta=BETA, importance_sampling_level=level, impl=impl).loss


def _liger(inplace):
    def build(x, leaf, level, impl):
        triton_grpo_loss = pytest.importorskip("liger_kernel.transformers.grpo_loss").triton_grpo_loss
        return lambda: triton_grpo_loss(
            leaf, x["old"], x["ref"], x["target"], x["adv"], x["mask"], temperature=1.0, beta=BETA, eps_low=0.2,
            eps_high=0.2, inplace=inplace, loss_type="grpo", importance_sampling_level=level, reduce=True)[0]
    return build


PROVIDERS = {p.name: p for p in [
    Provider("torch_eager", False, _trl(trl_grpo_loss)),
    Provider("torch_compile", False, _trl(torch.compile(trl_grpo_loss, dynamic=False))),
    Provider("r1vl", True, _r1vl()),
    Provider("r1vl_inplace", True, _r1vl(inplace=True), inplace=True, gpu_only=True),
    Provider("r1vl_padded", False, _r1vl_padded, gpu_only=True),
    Provider("liger", False, _liger(False), gpu_only=True),
    Provider("liger_inplace", False, _liger(True), inplace=True, gpu_only=True),
]}


def cases():
    """(shape id, level, pass, provider name): plain strings, so the JSON's params read."""
    for shape in SHAPES.values():
        for level in shape.levels:
            for pass_ in PASSES:
                for p in PROVIDERS.values():
                    if shape.device == "cpu" and p.gpu_only:
                        continue
                    yield pytest.param(shape.id, level, pass_, p.name, id=f"{shape.id}-{level}-{pass_}-{p.name}",
                                       marks=device_marks(shape.device))


# ----------------------------------------------------------------------------- the benchmark


@torch.no_grad()
def _copy_into(dst, src):
    dst.copy_(src)


@pytest.mark.parametrize("shape, level, pass_, provider", list(cases()))
def test_grpo_loss(benchmark, measure, shape, level, pass_, provider):
    shape, provider = SHAPES[shape], PROVIDERS[provider]
    x = inputs(shape)
    base = x["logits"]
    if provider.packed:
        leaf = base[:, :-1].reshape(-1, shape.V).clone()
    else:  # in-place providers write into their own copy; the others share the cached logits
        leaf = base.clone() if provider.inplace else base.detach()
    leaf.requires_grad_()
    restore = None
    if provider.inplace:  # its backward leaves dlogits in the leaf: put the logits back (untimed)
        restore = functools.partial(_copy_into, leaf, leaf.detach().clone() if provider.packed else base)
    impl = "triton" if shape.device == "cuda" else "torch"
    loss_fn = provider.build(x, leaf, level, impl)

    benchmark.group = f"grpo_loss {shape} {level} {pass_}"
    logits_bytes = shape.N * shape.V * base.element_size()
    work = Work(bytes={"fwd": 1, "bwd": 2, "fwd+bwd": 3}[pass_] * logits_bytes)
    measure(pass_, loss_fn, [leaf], shape.device, work, restore=restore, provider=provider.name,
            impl=impl if provider.name.startswith("r1vl") else None, N=shape.N, V=shape.V,
            dtype=dtype_name(shape.dtype), level=level, loss_type="grpo", beta=BETA)
