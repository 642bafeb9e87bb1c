"""Metrics: one JSON line per step in RUN_DIR/metrics.jsonl and a short console line.

Only rank 0 writes; other ranks get a logger that does nothing, so the loop never branches
on rank. Values are plain floats already reduced over ranks by the caller.
"""
from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from pathlib import Path

import torch

# What the console line shows, in order, when present.
CONSOLE_KEYS = ("reward", "accuracy", "step_rar", "step_rvr", "kl", "entropy", "completion_len",
                "loss", "tokens_per_s", "time_rollout", "time_update")


class MetricsLog:
    """JSONL always; TensorBoard event files in RUN_DIR/tensorboard too when the tensorboard
    package is installed (scalars tagged "<stage>/<name>")."""

    def __init__(self, run_dir: str | Path, enabled: bool, name: str = "metrics.jsonl"):
        self.enabled = enabled
        self.path = Path(run_dir) / name
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None
        self._tensorboard = _tensorboard_writer(Path(run_dir) / "tensorboard") if enabled else None

    def log(self, record: dict) -> None:
        """Append one record (a flat dict of str -> number/str) as a JSON line, flushed."""
        if self._file is None:
            return
        self._file.write(json.dumps({"time": time.time(), **record}) + "\n")
        self._file.flush()
        if self._tensorboard is not None and isinstance(record.get("step"), int):
            stage = record.get("stage", "train")
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(f"{stage}/{key}", value, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(log_dir))


def console_line(record: dict) -> str:
    head = f"{record.get('stage', '')} step {record.get('step', '?')}"
    parts = [f"{k} {record[k]:.4g}" for k in CONSOLE_KEYS if k in record]
    return head + " | " + "  ".join(parts)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kb / (2**30 if sys.platform == "darwin" else 2**20)


class Timer:
    """Wall time per phase: `with timer("rollout"): ...`. On CUDA the phase ends with a
    sync, so that it is charged for its own kernels rather than the next phase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """{"time_<phase>": seconds} since the last pop."""
        totals, self.totals = self.totals, {}
        return {f"time_{k}": v for k, v in totals.items()}
