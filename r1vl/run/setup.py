"""What a run settles before it trains: its options checked, its directory, the checkpoint it
resumes from, its data split, and transformers kept quiet and offline."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from r1vl import distributed
from r1vl.config import Config, DataOptions, to_dict
from r1vl.data.table import TableOptions, open_examples
from r1vl.deepspeed_config import read_deepspeed_config
from r1vl.model.policy import check_checkpoint_dir
from r1vl.rewards.functions import parse_reward_funcs
from r1vl.rewards.worker import reward_worker
from r1vl.run.checkpoints import ResumePoint, find_resume_point, open_resume_point
from r1vl.run.trackers import parse_report_to

RESUME_INVARIANTS = {  # option -> why a resumed run must keep it
    "freeze_vision_tower": "the saved optimizer state covers exactly the parameters that were trained",
    "lora_rank": "the checkpoint holds LoRA adapters of this rank (or the full weights, rank 0) and their optimizer state",
    "lora_target_modules": "the saved adapters and their optimizer state cover exactly these modules",
    "lora_vision": "the saved adapters and their optimizer state cover exactly these modules",
}


def check_inputs(cfg: Config) -> None:
    """What can be checked before any process group or model exists (ValueError naming it):
    the files the options name, every --data record, the --deepspeed file against --dtype and
    --max_grad_norm, the reward functions."""
    if cfg.policy.model != "tiny":
        check_checkpoint_dir(cfg.policy.model)
    if cfg.run.resume and cfg.run.resume != "auto":
        find_resume_point(cfg.run.resume, Path(cfg.run.run_dir))
    dataset = cfg.dataset
    if dataset.sft_data and not Path(dataset.sft_data).is_file():
        raise ValueError(f"--sft_data {dataset.sft_data}: no such file")
    if dataset.data:  # every data error before the model loads (a BadRecordError is a ValueError)
        table = _open_examples(TableOptions.of(dataset), keep=True)
        if not len(table):
            raise ValueError(f"--data {dataset.data}: no usable records" + (" (all skipped)" if table.bad else ""))
        if int(os.environ.get("RANK", "0")) == 0:  # no process group yet
            print(table.summary(), flush=True)
    if cfg.optimizer.deepspeed:
        raw = read_deepspeed_config(cfg.optimizer.deepspeed, cfg.policy.dtype, cfg.optimizer.max_grad_norm)
        zero = raw.get("zero_optimization", {}).get("stage", 0)
        if cfg.policy.lora_rank and zero == 3 and cfg.run.stage == "sft+grpo":
            raise ValueError("--lora_rank with --stage sft+grpo under ZeRO-3: the warm-up's adapters are folded "
                             "into the sharded base between the stages, which is not done; run --stage sft, then "
                             "--stage grpo with --model on its final/")
    parse_report_to(cfg.run.report_to)  # a tracker asked for but not installed stops here
    rewards = cfg.reward
    specs = parse_reward_funcs(rewards.reward_funcs, rewards.reward_weights)  # syntax, files, weights
    if "grpo" in cfg.run.stages and any(not s.builtin for s in specs):
        reward_worker(specs, rewards.reward_timeout_s)  # imports the user's functions: a bad one stops here


_checked: dict = {}  # TableOptions -> the table check_inputs opened, taken once by split_data


def _open_examples(options: TableOptions, keep: bool = False):
    """open_examples, once per run: what check_inputs opened and checked is what split_data
    uses (not reopened and rechecked), then forgotten (a later run in this process rereads)."""
    table = _checked.pop(options, None)
    if table is None:
        table = open_examples(options)
    if keep:
        _checked[options] = table
    return table


def quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched at run time
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def setup_run_dir(cfg: Config, world: distributed.Dist) -> Path:
    """--run_dir (default runs/<date-time>), made by rank 0 with the run's config.json."""
    name = cfg.run.run_dir or time.strftime("runs/%Y%m%d-%H%M%S")
    name = distributed.broadcast_object(name)  # ranks may start in different seconds
    run_dir = Path(name)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    distributed.barrier()
    return run_dir


def resume_invariants(cfg: Config) -> dict:
    options = cfg.flat()
    return {option: options[option] for option in RESUME_INVARIANTS}


def resume_point(cfg: Config, run_dir: Path, world: distributed.Dist) -> ResumePoint | None:
    """The checkpoint to continue from, if any, checked against this run's ranks and options."""
    resume = open_resume_point(cfg.run.resume, run_dir)
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
    elif cfg.run.resume == "auto":
        distributed.print0(f"--resume auto: no checkpoint in {run_dir / 'checkpoints'} yet; starting afresh")
    return resume


def split_data(data: str, dataset: DataOptions, eval_prompts: int) -> tuple[list, list]:
    """(training examples, the last eval_prompts examples held out for evaluation): sequences
    of Examples made when indexed (r1vl.data.table). data: the file or directory to read (the
    built-in demo's synthetic file when --data is empty); dataset: how to read it."""
    examples = _open_examples(TableOptions.of(dataset, data)) if data else []
    held_out = examples[len(examples) - eval_prompts:] if eval_prompts else []
    return examples[:len(examples) - len(held_out)], held_out
