"""Data parallelism in a few functions: init, rank-aware printing, reductions, clean exit.

`torchrun --nproc_per_node=N train.py` sets RANK / WORLD_SIZE / LOCAL_RANK; plain
`python train.py` is a world of one and never touches torch.distributed. Gloo on CPU,
NCCL on GPUs. Gradients are all-reduced by hand (`all_reduce_grads`) once per optimizer
step, after all micro-batches: the step is the seam where a DeepSpeed engine takes over.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto", always_group: bool = False) -> Dist:
    """Start the process group when launched by torchrun; pick this rank's device.

    device: "auto" (this rank's GPU if there is one, else the CPU), "cpu" or "cuda".
    always_group: start a group even for a single process (`python train.py`): DeepSpeed
        needs one and would otherwise look for MPI.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    elif always_group and not dist.is_initialized():
        # What torchrun would have set for a world of one (DeepSpeed reads LOCAL_RANK).
        for name in ("RANK", "LOCAL_RANK"):
            os.environ.setdefault(name, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(rank, world_size, local_rank, dev)


def destroy(wait_for_others: bool = True) -> None:
    """Tear the process group down before exit: without it gloo/NCCL can abort at shutdown
    ("terminate called without an active exception") after a run that finished fine.
    After an error on this rank only, do not wait: the others may never arrive, and torchrun
    stops them once this process exits."""
    if dist.is_initialized():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum Python numbers over ranks (one collective for the whole list)."""
    if not dist.is_initialized():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def is_sharded(model: torch.nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned the parameters (each rank holds a shard
    and `p` itself is an empty placeholder outside gathered())."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def gathered(model: torch.nn.Module, modifier_rank: int | None = None):
    """Context in which every parameter of `model` holds its full value on every rank; a
    no-op unless ZeRO-3 sharded it (deepspeed is imported only then). With modifier_rank,
    that rank's values are broadcast to all on exit (for writing weights)."""
    if not is_sharded(model):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=modifier_rank)


def weight_digests(model: torch.nn.Module) -> list[str]:
    """SHA-256 of every rank's parameter bytes (the full weights, gathered first if sharded),
    collected on all ranks: data parallelism is right only if these are all equal."""
    h = hashlib.sha256()
    with gathered(model):
        for p in model.parameters():
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    if not dist.is_initialized():
        return [digest]
    digests: list = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    return digests


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's weights to every rank, so that all start identical whatever they loaded.
    Sharded (ZeRO-3) weights are gathered, and rank 0's written back to every shard."""
    if not dist.is_initialized():
        return
    if is_sharded(model):
        with gathered(model, modifier_rank=0):
            pass  # leaving the context broadcasts rank 0's full values and re-partitions them
        return
    for p in model.parameters():
        dist.broadcast(p.data, src=0)


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over ranks. The losses are already normalized by global counts, so a sum
    (not a mean) gives the full-batch gradient. A rank that had nothing to backprop this step
    (all its prompts skipped) contributes zeros."""
    if not dist.is_initialized():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # Flat buckets: a collective per parameter would be hundreds of round trips.
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        bucket.append(p.grad)
        size += p.grad.numel()
        if size >= _BUCKET_ELEMENTS:
            _all_reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _all_reduce_bucket(bucket)


_BUCKET_ELEMENTS = 32 * 2**20


def _all_reduce_bucket(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()
