"""What a run settles before it trains: its options checked, its directory, the checkpoint it
resumes from, its data split, and transformers kept quiet and offline."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from r1vl import distributed
from r1vl.config import Config, to_dict
from r1vl.data.records import load_examples
from r1vl.model.policy import check_checkpoint_dir
from r1vl.run.checkpoints import ResumePoint, find_resume_point, open_resume_point

RESUME_INVARIANTS = {  # option -> why a resumed run must keep it
    "freeze_vision_tower": "the saved optimizer state covers exactly the parameters that were trained",
    "lora_rank": "the checkpoint holds LoRA adapters of this rank (or the full weights, rank 0) and their optimizer state",
    "lora_target_modules": "the saved adapters and their optimizer state cover exactly these modules",
    "lora_vision": "the saved adapters and their optimizer state cover exactly these modules",
}


def check_inputs(cfg: Config) -> None:
    """What can be checked before any process group or model exists (ValueError naming it)."""
    if cfg.model != "tiny":
        check_checkpoint_dir(cfg.model)
    if cfg.resume and cfg.resume != "auto":
        find_resume_point(cfg.resume, Path(cfg.run_dir))
    for option in ("data", "sft_data"):
        path = getattr(cfg, option)
        if path and not Path(path).is_file():
            raise ValueError(f"--{option} {path}: no such file")


def quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched at run time
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def setup_run_dir(cfg: Config, world: distributed.Dist) -> Path:
    """--run_dir (default runs/<date-time>), made by rank 0 with the run's config.json."""
    name = cfg.run_dir or time.strftime("runs/%Y%m%d-%H%M%S")
    name = distributed.broadcast_object(name)  # ranks may start in different seconds
    run_dir = Path(name)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    distributed.barrier()
    return run_dir


def resume_invariants(cfg: Config) -> dict:
    return {option: getattr(cfg, option) for option in RESUME_INVARIANTS}


def resume_point(cfg: Config, run_dir: Path, world: distributed.Dist) -> ResumePoint | None:
    """The checkpoint to continue from, if any, checked against this run's ranks and options."""
    resume = open_resume_point(cfg.resume, run_dir)
    if resume is not None and resume.world_size != world.world_size:
        raise SystemExit(f"error: {resume.path} was written by {resume.world_size} rank(s), this run has "
                         f"{world.world_size}: the data order and every rank's random state depend on it")
    if resume is not None:
        for option, value in resume_invariants(cfg).items():
            if option in resume.invariants and resume.invariants[option] != value:
                raise SystemExit(f"error: {resume.path} was written with --{option} {resume.invariants[option]}, "
                                 f"this run has {value}: {RESUME_INVARIANTS[option]}")
    if resume is not None:
        distributed.print0(f"resuming from {resume.path} ({resume.stage} step {resume.step})")
    elif cfg.resume == "auto":
        distributed.print0(f"--resume auto: no checkpoint in {run_dir / 'checkpoints'} yet; starting afresh")
    return resume


def split_data(data: str, cfg: Config) -> tuple[list, list]:
    """(training examples, the last eval_prompts examples held out for evaluation)."""
    examples = load_examples(data, cfg.image_root or None).items if data else []
    held_out = examples[len(examples) - cfg.eval_prompts:] if cfg.eval_prompts else []
    return examples[:len(examples) - len(held_out)], held_out
