"""Timing, ceilings, the environment fields and CSV helpers shared by the benchmarks."""
import csv
import datetime
import os
import statistics
import subprocess
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def bench(fn, device, warmup=3, reps=10):
    """Median time of fn() in ms (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device):
    """Bytes read + written per second by a plain tensor copy: the memory-bound ceiling."""
    n = (1 << 30) if device == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / (bench(lambda: dst.copy_(src), device) * 1e-3)


def matmul_flops(device, dtype):
    """FLOP/s of a large plain matmul in dtype: the compute-bound ceiling."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / (bench(lambda: a @ b, device) * 1e-3)


def environment():
    """Fields every result row carries: time, commit, device, library versions."""
    try:
        from importlib.metadata import version
        liger = version("liger-kernel")
    except Exception:
        liger = ""
    import triton
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return dict(time=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                commit=commit, device=device, torch=torch.__version__, triton=triton.__version__, liger=liger)


def append_csv(name: str, rows: list) -> str:
    """Append rows (dicts with the same keys) to benchmarks/results/<name>; returns its path."""
    path = os.path.join(RESULTS_DIR, name)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def print_table(rows: list, columns: list) -> None:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r[c]).rjust(w) for c, w in zip(columns, widths)))
