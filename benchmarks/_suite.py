"""The loss-kernel benchmark suite's protocol (pytest-benchmark): how a pass is timed, the
device ceilings, and the fields every result row carries.

Timing. A benchmark is one pass (fwd, bwd or fwd+bwd) split into setup() and target() for
benchmark.pedantic. setup() does the untimed part (drops the leaves' grads, puts back logits
an in-place backward overwrote, and for bwd runs the forward whose backward is timed) and ends
with torch.cuda.synchronize(); target() runs the pass and synchronizes before it returns. So
pytest-benchmark's wall clock (time.perf_counter) spans the launches and all the GPU work of
the pass, and nothing queued before it. Warm-up rounds (torch.compile's compilation, Triton's
JIT and autotuning, the caching allocator's first allocations) run outside the timed rounds;
the number of timed rounds is what fills --benchmark-max-time (setup included), at least
--benchmark-min-rounds. The GPU shapes are far larger than the L2 cache, so no flush between
rounds.

extra_info (every row of the JSON that --benchmark-json / --benchmark-autosave writes):
median_ms, bytes_moved and GB_s; for the loss from logits the HBM floor (bytes_moved at the copy
bandwidth measured in the same session) and of_hbm_floor = floor / median; for the loss from
hidden states flops, TFLOP_s and of_matmul_ceiling (against a plain matmul in the same dtype
measured in the same session); peak_mem_added_MB (CUDA: the peak allocated during one target() above what was
allocated when it began; None on the CPU); the device, torch / triton / liger-kernel versions
and the commit.
"""
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
from _common import copy_bandwidth, matmul_flops

PASSES = ("fwd", "bwd", "fwd+bwd")
BASELINE = "torch_eager"  # the provider the summary's speedups are relative to
# Untimed rounds before the timed ones: the first compiles (torch.compile, Triton's JIT) and
# autotunes, the second, settled, sizes the number of timed rounds.
WARMUP_ROUNDS = 2


def device_marks(device: str) -> list:
    """A case on the CPU is marked cpu (its id starts with "cpu" too, so -k cpu and -m cpu
    select the same); one on a GPU skips without one."""
    if device == "cpu":
        return [pytest.mark.cpu]
    return [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- work and ceilings


@dataclass(frozen=True)
class Work:
    """What a pass must do at least: the yardstick of its time."""
    bytes: int      # memory traffic of the pass (reads + writes of the big tensors)
    flops: int = 0  # matmul FLOPs; 0 for the memory-bound loss from logits
    dtype: torch.dtype = torch.bfloat16  # of the matmuls: the ceiling is measured in it


class Ceilings:
    """Copy bandwidth (bytes read + written per second) of a device and matmul FLOP/s of a
    device in a dtype, each measured once per session, when first asked for."""

    def __init__(self):
        self._copy, self._matmul = {}, {}

    def copy_bytes_per_s(self, device: str) -> float:
        if device not in self._copy:
            self._copy[device] = copy_bandwidth(device)
        return self._copy[device]

    def matmul_flop_per_s(self, device: str, dtype: torch.dtype) -> float:
        if (device, dtype) not in self._matmul:
            self._matmul[device, dtype] = matmul_flops(device, dtype)
        return self._matmul[device, dtype]


# ----------------------------------------------------------------------------- the protocol


def pass_functions(pass_: str, loss_fn: Callable, leaves: list, restore: Optional[Callable], device: str):
    """(setup, target) of one pass. target returns nothing, so no round keeps the previous
    round's graph (and the buffers it saved) alive into the next."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def reset():
        for leaf in leaves:
            leaf.grad = None
        if restore is not None and pass_ != "fwd":  # a forward reads the logits, never writes them
            restore()

    if pass_ == "bwd":
        def setup():
            reset()
            loss = loss_fn()
            sync()
            return (loss,), {}

        def target(loss):
            loss.backward()
            sync()
        return setup, target

    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")

    def setup():
        reset()
        sync()

    def target():
        loss = loss_fn()
        if pass_ == "fwd+bwd":
            loss.backward()
        sync()
    return setup, target


def _run(setup, target) -> float:
    """One round outside pytest-benchmark; returns the seconds it took, setup included."""
    start = time.perf_counter()
    args, kwargs = setup() or ((), {})
    target(*args, **kwargs)
    return time.perf_counter() - start


def _peak_added(setup, target) -> int:
    args, kwargs = setup() or ((), {})
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    target(*args, **kwargs)
    return torch.cuda.max_memory_allocated() - base


def measure(benchmark, config, ceilings: Ceilings, env: dict, pass_: str, loss_fn: Callable, leaves: list,
            device: str, work: Work, restore: Optional[Callable] = None, **fields) -> None:
    """Time one pass of loss_fn (a callable returning a scalar loss of the leaves) and fill
    the row's extra_info with work, ceilings, memory and environment, plus fields."""
    setup, target = pass_functions(pass_, loss_fn, leaves, restore, device)
    if benchmark.disabled:  # --benchmark-disable: run the pass once, untimed
        benchmark.pedantic(target, setup=setup)
        return
    try:
        for _ in range(WARMUP_ROUNDS):
            once = _run(setup, target)
        peak = _peak_added(setup, target) if device == "cuda" else None
        # Rounds to fill max_time with setup included: a backward that only hands over what
        # its forward computed takes microseconds, its setup (that forward) does not.
        rounds = max(int(config.getoption("benchmark_min_rounds")),
                     math.ceil(float(config.getoption("benchmark_max_time")) / max(once, 1e-9)))
        benchmark.pedantic(target, setup=setup, rounds=rounds)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"out of memory: {benchmark.name}")

    seconds = benchmark.stats.stats.median
    info = dict(fields, **{"pass": pass_, "median_ms": seconds * 1e3, "bytes_moved": work.bytes,
                           "GB_s": work.bytes / seconds / 1e9})
    if work.flops:
        ceiling = ceilings.matmul_flop_per_s(device, work.dtype)
        info.update(flops=work.flops, TFLOP_s=work.flops / seconds / 1e12, matmul_ceiling_TFLOP_s=ceiling / 1e12,
                    matmul_ceiling_ms=work.flops / ceiling * 1e3, of_matmul_ceiling=work.flops / seconds / ceiling)
    else:
        ceiling = ceilings.copy_bytes_per_s(device)
        info.update(copy_GB_s=ceiling / 1e9, hbm_floor_ms=work.bytes / ceiling * 1e3,
                    of_hbm_floor=work.bytes / ceiling / seconds)
    info.update(peak_mem_added_MB=None if peak is None else peak / 2**20,
                device=env["device"] if device == "cuda" else "cpu", torch=env["torch"], triton=env["triton"],
                liger_kernel=env["liger"] or None, commit=env["commit"])
    benchmark.extra_info.update(info)
    ROWS.append((benchmark.group, info))


# ----------------------------------------------------------------------------- the summary

ROWS: list = []  # (group, extra_info) of every timed row of the session, for summary()


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def summary() -> list[str]:
    """Lines of one table per group: each provider's median, speedup over torch_eager, the
    work rate and its share of the ceiling, and the peak memory added (what the timing
    tables of pytest-benchmark do not show)."""
    groups: dict = {}
    for group, info in ROWS:
        groups.setdefault(group, []).append(info)
    lines = []
    for group, rows in groups.items():
        rows.sort(key=lambda r: r["median_ms"])
        base = next((r["median_ms"] for r in rows if r["provider"] == BASELINE), None)
        hidden = "flops" in rows[0]
        rate, share = ("TFLOP/s", "of_matmul") if hidden else ("GB/s", "of_floor")
        floor = rows[0]["matmul_ceiling_ms"] if hidden else rows[0]["hbm_floor_ms"]
        lines.append(f"{group}   ({'matmul ceiling' if hidden else 'copy-bandwidth floor'} {floor:,.3f} ms)")
        table = [("provider", "median ms", f"vs {BASELINE}", rate, share, "peak MB")]
        for r in rows:
            speedup = "-" if base is None else f"{base / r['median_ms']:.2f}x"
            table.append((r["provider"], _fmt(r["median_ms"], 3), speedup,
                          _fmt(r["TFLOP_s"] if hidden else r["GB_s"], 2),
                          _fmt(r["of_matmul_ceiling"] if hidden else r["of_hbm_floor"], 3),
                          _fmt(r["peak_mem_added_MB"], 0)))
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        notes = [""] + [f"  ({r['note']})" if r.get("note") else "" for r in rows]
        lines += ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                  + note for row, note in zip(table, notes)]
        lines.append("")
    return lines


if __name__ == "__main__":  # python benchmarks/_suite.py RUN.json ...: the summary of stored runs
    import json
    import sys

    for path in sys.argv[1:]:
        with open(path) as f:
            timed = [b for b in json.load(f)["benchmarks"] if "median_ms" in b["extra_info"]]
        ROWS[:] = [(b["group"], b["extra_info"]) for b in timed]
        print(f"{path}\n" + "\n".join(summary()))
