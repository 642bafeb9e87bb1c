"""Metrics: one JSON line per step in RUN_DIR/metrics.jsonl and a short console line.

Only rank 0 writes; other ranks get a logger that does nothing, so the loop never branches
on rank. Values are plain floats, reduced over ranks by `reduce_over_ranks` first.
"""
from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from pathlib import Path

import torch

from r1vl import distributed, files
from r1vl.run.samples import SamplesLog

# What the console line shows, in order, when present.
CONSOLE_KEYS = ("reward", "accuracy", "step_rar", "step_rvr", "undecided", "kl", "entropy",
                "completion_len", "loss", "tokens_per_s", "time_sample", "time_score", "time_update")

# Past this share of a step's completions with an undecided answer check, the verifier's
# budget is likely too short for the answers (or the policy found hostile ones).
UNDECIDED_WARN_FRACTION = 0.03


STAGE_ORDER = ("sft", "grpo")


class MetricsLog:
    """JSONL always; TensorBoard event files in RUN_DIR/tensorboard/<stage> too when the
    tensorboard package is installed (one run per stage, since their steps restart at 1).

    resumed_at: (stage, step) of the checkpoint a resumed run continues from. Records the
    interrupted run wrote after it are dropped from the JSONL, and TensorBoard is told to
    purge that stage's later events, so each step appears once.
    tensorboard: write the event files (--report_to has tensorboard). trackers: the other
    --report_to trackers (r1vl.run.trackers), each given every record too, closed with this log.
    """

    def __init__(self, run_dir: str | Path, enabled: bool, name: str = "metrics.jsonl",
                 resumed_at: tuple[str, int] | None = None, tensorboard: bool = True, trackers=()):
        self.enabled = enabled
        self.tensorboard = tensorboard
        self.trackers = list(trackers)
        self.path = Path(run_dir) / name
        self.tensorboard_dir = Path(run_dir) / "tensorboard"
        self.resumed_at = resumed_at
        if enabled and resumed_at is not None and self.path.is_file():
            _rewind(self.path, *resumed_at)
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None
        self._writers: dict = {}
        resumed_grpo = None if resumed_at is None else resumed_at[1] if resumed_at[0] == "grpo" else 0
        self.samples = SamplesLog(run_dir, enabled, resumed_grpo)

    def log(self, record: dict) -> None:
        """Append one record (a flat dict of str -> number/str) as a JSON line, flushed."""
        if self._file is None:
            return
        self._file.write(json.dumps({"time": time.time(), **record}) + "\n")
        self._file.flush()
        for tracker in self.trackers:
            tracker.log(record)
        writer = self._writer(record.get("stage", "train"))
        if writer is not None and isinstance(record.get("step"), int):
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(key, value, record["step"])

    def log_samples(self, rows: list[dict], step: int) -> None:
        """Sample completions (r1vl.run.samples rows): RUN_DIR/samples.jsonl and each tracker's table."""
        if self._file is None or not rows:
            return
        self.samples.log(rows)
        for tracker in self.trackers:
            tracker.log_samples(rows, step)

    def _writer(self, stage: str):
        if not self.tensorboard:
            return None
        if stage not in self._writers:
            purge = self.resumed_at[1] + 1 if self.resumed_at and self.resumed_at[0] == stage else None
            self._writers[stage] = _tensorboard_writer(self.tensorboard_dir / stage, purge)
        return self._writers[stage]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for writer in self._writers.values():
            if writer is not None:
                writer.close()
        self._writers = {}
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def _rewind(path: Path, stage: str, step: int) -> None:
    """Keep the records up to (stage, step); rewrite atomically."""
    def before(record: dict) -> bool:
        order = STAGE_ORDER.index(record.get("stage")) if record.get("stage") in STAGE_ORDER else -1
        return order < STAGE_ORDER.index(stage) or (order == STAGE_ORDER.index(stage) and record["step"] <= step)

    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line of a killed run may be cut short
            continue
        if before(record):
            kept.append(line)
    files.write_text(path, "".join(line + "\n" for line in kept))


def _tensorboard_writer(log_dir: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class UndecidedWarning:
    """Warns once (on stderr) when a step's undecided fraction passes `threshold`.

    `undecided` is the share of completions whose symbolic answer check ran out of its CPU
    budget or failed (r1vl.rewards.RewardBreakdown.undecided); such answers count as wrong,
    so a high share silently lowers the reward of right answers.
    """

    def __init__(self, threshold: float = UNDECIDED_WARN_FRACTION):
        self.threshold = threshold
        self.warned = False

    def __call__(self, fraction: float, step: int) -> bool:
        """Warn if this is the first step past the threshold; True when it warned."""
        if self.warned or not fraction > self.threshold:
            return False
        self.warned = True
        print(f"warning: step {step}: the answer check was undecided for {fraction:.1%} of the "
              f"completions (> {self.threshold:.0%}); they count as wrong. The symbolic "
              "verifier's CPU budget (SymbolicVerifier timeout_s) may be too short for these "
              "answers. Shown once; the 'undecided' metric has every step.", file=sys.stderr)
        return True


def reduce_over_ranks(values: dict[str, float], device: torch.device, op: str = "sum") -> dict[str, float]:
    """{name: value} summed (op="sum") or maxed (op="max") over ranks, in one collective.
    Names stay bound to their values: the list a collective needs is built and read here only."""
    reduce = {"sum": distributed.all_reduce_sum, "max": distributed.all_reduce_max}[op]
    names = list(values)
    return dict(zip(names, reduce([float(values[k]) for k in names], device)))


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
    """Wall time per phase: `with timer("sample"): ...`. On CUDA the phase ends with a
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


def grpo_step_metrics(rollout, rewards, batch, update: dict, seconds: float, world) -> dict:
    """One StepGRPO step's numbers, reduced over ranks: per completion, per completion token, totals.

    rollout: r1vl.sampling.sampler.Rollout; rewards: their RewardBreakdown; batch: the packed
    r1vl.update.microbatches.Batch; update: r1vl.update.grpo.grpo_update's numbers.
    """
    r, G = rewards, rollout.group_size
    lengths = [len(s.completion_ids) for s in batch.sequences]
    packed_tokens = [mb.packed.num_tokens for mb in batch.microbatches]
    groups = r.total.reshape(-1, G) if batch.sequences else None
    per_completion = {"reward": r.total.sum(), "accuracy": r.accuracy.sum(), "step_rar": r.step_rar.sum(),
                      "step_rvr": r.step_rvr.sum(), "key_step_match": r.key_step_match.sum(),
                      "has_answer": r.has_answer.sum(), "undecided": r.undecided.sum(),
                      "truncated": (~rollout.completions.stopped).sum(),
                      "completion_len": sum(lengths)}
    per_token = {k: update[k] for k in ("kl", "entropy", "clip_low", "clip_high")}
    totals = {"loss": update["loss"], "skipped_prompts": rollout.skipped, "split_prompt_groups": batch.split_groups,
              "tokens": sum(len(p.ids) for p in rollout.prompts) * G + sum(lengths),
              "groups": len(rollout.prompts),
              "reward_std_in_group": groups.std(axis=1, ddof=1).sum() if groups is not None else 0.0,
              "packed_tokens": sum(packed_tokens),
              # Lockstep micro-batches cost as much as the largest one.
              "longest_microbatch_sum": max(packed_tokens, default=0) * len(packed_tokens),
              # Rows the sampler decoded (finished rows leave its batch every few tokens).
              "decode_slots": rollout.completions.decode_slots}
    total = reduce_over_ranks({**per_completion, **per_token, **totals}, world.device)
    S, N = update["sequences"], update["tokens"]
    return {
        "grad_norm": update["grad_norm"],
        **{k: total[k] / max(S, 1) for k in per_completion},
        "loss": total["loss"],
        **{k: total[k] / max(N, 1) for k in per_token},
        "reward_std_in_group": total["reward_std_in_group"] / total["groups"] if total["groups"] else 0.0,
        "skipped_prompts": total["skipped_prompts"], "split_prompt_groups": total["split_prompt_groups"],
        "sequences": S,
        "tokens_per_s": total["tokens"] / seconds,
        "pack_efficiency": total["packed_tokens"] / max(total["longest_microbatch_sum"], 1),
        "decode_efficiency": N / max(total["decode_slots"], 1),
        **reduce_over_ranks({"peak_memory_gb": peak_memory_gb(world.device)}, world.device, op="max"),
    }



def reward_function_metrics(rewards, world) -> dict:
    """Each --reward_funcs function's mean as rewards/<name>, over the completions it had an
    opinion on (TRL's nanmean; NaN when it had none), reward_weighted (the mean of the weighted
    total the advantages use; equals `reward` for the default functions) and unscorable (the
    share of completions no function had an opinion on), reduced over ranks in one collective.

    rewards: r1vl.rewards.scorer.StepRewards.
    """
    values = rewards.per_function
    present = ~torch.isnan(values)
    total_present = ~torch.isnan(rewards.total)
    sums = {}
    for i, name in enumerate(rewards.names):
        sums[f"rewards/{name}"] = float(values[present[:, i], i].double().sum())
        sums[f"rewards/{name}/count"] = float(present[:, i].sum())
    sums["reward_weighted"] = float(rewards.total[total_present].double().sum())
    sums["reward_weighted/count"] = float(total_present.sum())
    sums["completions"] = float(len(rewards.total))
    total = reduce_over_ranks(sums, world.device)
    out = {}
    for key in [*(f"rewards/{name}" for name in rewards.names), "reward_weighted"]:
        count = total[f"{key}/count"]
        out[key] = total[key] / count if count else float("nan")
    out["unscorable"] = (total["completions"] - total["reward_weighted/count"]) / max(total["completions"], 1)
    return out
