"""Trainer checkpoints: written atomically, the last few kept, resumed exactly.

Layout: RUN_DIR/checkpoints/step_00000012/ holds whatever the trainer writes (the policy
in HF format, optimizer and scheduler state, trainer_state.json, one rng_rank{r}.pt per
rank). It is written as RUN_DIR/checkpoints/.tmp-step_00000012 by every rank, then renamed
by rank 0 once all ranks are done: a directory under its final name is always complete,
so a run killed while writing resumes from the previous checkpoint, which is untouched.

Loading uses safe formats only: safetensors and JSON, and torch.load(weights_only=True)
for optimizer and RNG tensors; nothing a user did not write is unpickled.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

PREFIX, TMP_PREFIX = "step_", ".tmp-step_"


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first; unfinished temporaries are ignored."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(PREFIX) and path.name[len(PREFIX):].isdigit():
            found.append((int(path.name[len(PREFIX):]), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, write: Callable[[Path], None], *, keep_last: int,
                    rank: int = 0, barrier: Callable[[], None] = lambda: None) -> Path:
    """Write checkpoint `step` atomically and keep the newest `keep_last`; every rank calls this.

    write(tmp_dir) runs on every rank (each writes its own files into tmp_dir); barrier()
    synchronizes the ranks (a no-op in one process). Returns the final directory.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = checkpoints_root(run_dir)
    tmp, final = root / f"{TMP_PREFIX}{step:08d}", root / f"{PREFIX}{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing
        tmp.mkdir(parents=True)
    barrier()
    write(tmp)
    barrier()
    if rank == 0:
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again after a resume
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- RNG state


def rng_file(checkpoint: Path, rank: int) -> Path:
    return Path(checkpoint) / f"rng_rank{rank}.pt"


def save_rng(checkpoint: Path, rank: int) -> None:
    """This process's Python, NumPy, torch and CUDA generator states, as tensors and numbers
    (loadable with weights_only=True)."""
    version, py_state, gauss = random.getstate()
    kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": (version, torch.tensor(py_state, dtype=torch.int64), gauss),
        "numpy": (kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(state, rng_file(checkpoint, rank))


def load_rng(checkpoint: Path, rank: int) -> None:
    path = rng_file(checkpoint, rank)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: was the checkpoint written with another number of ranks?")
    state = torch.load(path, weights_only=True)
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state.tolist()), gauss))
    kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
