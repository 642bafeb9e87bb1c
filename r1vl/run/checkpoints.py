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

import json
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from r1vl import distributed, files
from r1vl.model.lora import has_adapters
from r1vl.model.policy import save_full_adapter, save_full_policy
from r1vl.run import checkpoint_check

PREFIX = "step_"


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
    final = checkpoints_root(run_dir) / f"{PREFIX}{step:08d}"
    tmp = files.temporary(final, clear=rank == 0)  # rank 0 clears what a run killed while writing left
    if rank == 0:
        tmp.mkdir(parents=True)
    barrier()
    write(tmp)
    barrier()
    if rank == 0:
        files.publish(tmp, final, durable=True)  # replaces the same step saved again after a resume
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


# ----------------------------------------------------------------------------- RNG state


def rng_file(checkpoint: Path, rank: int) -> Path:
    return Path(checkpoint) / f"rng_rank{rank}.pt"


def save_rng(checkpoint: Path, rank: int, generators: dict[str, torch.Generator] | None = None) -> None:
    """This process's Python, NumPy, torch and CUDA generator states, and those of the
    trainer's own `generators` (e.g. the rollout sampler's), as tensors and numbers
    (loadable with weights_only=True)."""
    version, py_state, gauss = random.getstate()
    kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": (version, torch.tensor(py_state, dtype=torch.int64), gauss),
        "numpy": (kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    torch.save(state, rng_file(checkpoint, rank))


def load_rng(checkpoint: Path, rank: int, generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore what save_rng saved; each of `generators` gets the state saved under its name."""
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
    for name, generator in (generators or {}).items():
        if name not in state["generators"]:
            raise KeyError(f"{path} holds no state for the generator {name!r}")
        generator.set_state(state["generators"][name])


# ----------------------------------------------------------------------------- trainer state

STATE_FILE = "trainer_state.json"


def write_trainer_state(checkpoint: Path, state: dict) -> None:
    (Path(checkpoint) / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")


def read_trainer_state(checkpoint: Path) -> dict:
    """The trainer_state.json of a complete checkpoint; ValueError naming what is missing."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ValueError(f"--resume {checkpoint}: not a directory")
    if not (checkpoint / STATE_FILE).is_file():
        raise ValueError(f"--resume {checkpoint}: no {STATE_FILE}; not a complete trainer checkpoint")
    return json.loads((checkpoint / STATE_FILE).read_text())


# ----------------------------------------------------------------------------- the trainer's checkpoints


class Checkpointer:
    """What one trainer checkpoint holds, and when it is written.

    Every `save_every` optimizer steps of a stage and at the stage's last step (0 = never):
      policy/              the policy in Hugging Face format (safetensors, tokenizer, processor);
      adapter/             with LoRA instead: the adapters as peft saves them (the base is --model
                           or, in StepGRPO, the KL reference's directory)
      optimizer.pt, ...    the engine's state (r1vl.update.engine: optimizer, schedule, skip count)
      rng_rank{r}.pt       every rank's generator states, the rollout sampler's included
      trainer_state.json   stage, step, world size, data position, the reference's location,
                           the options a resumed run must share (`invariants`)
    Directories are named by the run's global step (warm-up steps, then GRPO steps), so the
    newest is the one to resume from whatever stage it is in.
    """

    def __init__(self, run_dir: Path, save_every: int, keep_last: int, sft_steps: int, world,
                 invariants: dict | None = None):
        self.run_dir, self.save_every, self.keep_last, self.sft_steps, self.world = (
            Path(run_dir), save_every, keep_last, sft_steps, world)
        self.invariants = dict(invariants or {})  # e.g. which parameters the optimizer state covers

    def global_step(self, stage: str, step: int) -> int:
        return step if stage == "sft" else self.sft_steps + step

    def due(self, step: int, last_step: int) -> bool:
        return self.save_every > 0 and (step % self.save_every == 0 or step == last_step)

    def save(self, policy, engine, stage: str, step: int, state: dict,
             generators: dict[str, torch.Generator] | None = None) -> Path:
        """Write the checkpoint of (stage, step) on every rank; `state` goes into
        trainer_state.json (JSON-serializable: data position, evaluation results, ...)."""
        step_id = self.global_step(stage, step)

        def write(tmp: Path) -> None:
            if has_adapters(policy.model):  # LoRA: the adapters only; the frozen base is a directory already
                save_full_adapter(policy, tmp / "adapter", self.world)
            else:
                save_full_policy(policy, tmp / "policy", self.world)
            engine.save_state(tmp)
            save_rng(tmp, self.world.rank, generators)
            if self.world.is_main:
                write_trainer_state(tmp, {"stage": stage, "step": step, "global_step": step_id,
                                          "world_size": self.world.world_size,
                                          "invariants": self.invariants, **state})

        path = save_checkpoint(self.run_dir, step_id, write, keep_last=self.keep_last, rank=self.world.rank,
                               barrier=distributed.barrier)
        distributed.print0(f"checkpoint {path}")
        return path


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint to continue from, and its trainer_state.json, read once."""

    path: Path
    stage: str  # "sft" or "grpo": the stage the checkpoint was written in
    step: int  # that stage's optimizer steps done
    world_size: int  # ranks that wrote it (the data order and rng files depend on it)
    before: dict = field(default_factory=dict)  # GRPO: the evaluation before training
    reference: str | None = None  # GRPO: the directory of the KL reference's weights
    invariants: dict = field(default_factory=dict)  # options the resumed run must share

    @classmethod
    def read(cls, path: Path) -> ResumePoint:
        state = read_trainer_state(path)
        return cls(Path(path), state["stage"], state["step"], state["world_size"], state.get("before", {}),
                   state.get("reference"), state.get("invariants", {}))

    def of_stage(self, stage: str) -> ResumePoint | None:
        """Itself if it was written in `stage`, else None (that stage starts afresh or is done)."""
        return self if self.stage == stage else None


def open_resume_point(resume: str, run_dir: Path) -> ResumePoint | None:
    """find_resume_point, read."""
    path = find_resume_point(resume, run_dir)
    return ResumePoint.read(path) if path is not None else None


def find_resume_point(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint directory --resume names: "" none, "auto" the newest readable one in
    run_dir (None when there is none yet: a first launch of a job that always says auto).

    auto passes over a newest checkpoint that cannot be read (r1vl.run.checkpoint_check: a
    file cut short or damaged, trainer_state.json missing) to the one before, with a warning
    naming what is wrong; ValueError if there are checkpoints but none is readable, or if
    the one named explicitly is not."""
    if not resume:
        return None
    if resume == "auto":
        return _newest_readable(run_dir)
    read_trainer_state(Path(resume))  # complete, or a ValueError saying what is missing
    wrong = checkpoint_check.problem(Path(resume))
    if wrong:
        raise ValueError(f"--resume {resume}: {wrong}")
    return Path(resume)


def _newest_readable(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    unreadable = []
    for _, path in reversed(found):
        wrong = checkpoint_check.problem(path)
        if wrong is None:
            return path
        unreadable.append(f"{path}: {wrong}")
        distributed.print0(f"warning: --resume auto: skipping {path}: {wrong}", file=sys.stderr)
    if unreadable:
        raise ValueError("--resume auto: no readable checkpoint in " + str(checkpoints_root(run_dir)) + ": "
                         + "; ".join(unreadable))
    return None
