"""Sample completions: what the model writes, with its rewards, every --log_completions_every steps.

    rows = sample_rows(step, samples, rewards, advantages, num_prompts=2)
    SamplesLog(run_dir, enabled=world.is_main).log(rows)   # appended to RUN_DIR/samples.jsonl

One row per completion: the first `num_prompts` prompts of rank 0's batch, each with all G of
its completions (prompt-major, as sampled), each with its weighted reward, every reward
function's value (rewards/<name>, None where the function had no opinion), the paper's
components and its group-normalized advantage. Reading tensors only, it changes nothing in
the run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from r1vl import files

COMPONENTS = ("accuracy", "step_rar", "step_rvr", "key_step_match")


def sample_rows(step: int, samples, rewards, advantages, num_prompts: int) -> list[dict]:
    """samples: r1vl.sampling.sampler.Samples (P prompts, G completions each); rewards:
    r1vl.rewards.scorer.StepRewards; advantages: (P*G,) fp32 tensor. Returns
    min(P, num_prompts) * G dicts of JSON-ready values."""
    G = samples.group_size
    per_function = rewards.per_function.tolist()  # (N, F)
    total, adv = rewards.total.tolist(), advantages.float().cpu().tolist()
    rows = []
    for p, prompt in enumerate(samples.prompts[:num_prompts]):
        example = prompt.example
        for g in range(G):
            i = p * G + g
            row = {"step": step, "prompt_index": p, "completion_index": g,
                   "prompt": example.problem if example is not None else "",
                   "image": str(example.image_path) if example is not None else "",
                   "source": example.source if example is not None else "",
                   "completion": samples.texts[i], "reward": _number(total[i]), "advantage": _number(adv[i])}
            row.update({f"rewards/{name}": _number(v) for name, v in zip(rewards.names, per_function[i])})
            row.update({k: float(getattr(rewards.breakdown, k)[i]) for k in COMPONENTS})
            rows.append(row)
    return rows


def _number(value: float) -> float | None:
    """NaN (a function with no opinion) as None: JSON has no NaN."""
    return None if value is None or math.isnan(value) else float(value)


def console_lines(rows: list[dict], width: int = 100) -> list[str]:
    """A short form: per prompt its question, then one line per completion with its reward,
    advantage and the completion's start on one line."""
    lines, prompt = [], None
    for row in rows:
        if row["prompt_index"] != prompt:
            prompt = row["prompt_index"]
            lines.append(f"  sample step {row['step']} prompt {prompt}: {_one_line(row['prompt'], width)}")
        reward = "none" if row["reward"] is None else f"{row['reward']:.3f}"
        head = f"    g{row['completion_index']} reward {reward} adv {row['advantage'] or 0.0:+.2f} | "
        lines.append(head + _one_line(row["completion"], width - len(head)))
    return lines


def _one_line(text: str, width: int) -> str:
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= width else text[:max(width - 3, 0)] + "..."


class SamplesLog:
    """RUN_DIR/samples.jsonl, one JSON line per completion, on rank 0 (enabled) only.

    resumed_grpo_step: the StepGRPO step a resumed run continues from (0 when it resumes in
    the warm-up): rows of the interrupted run past it are dropped, so each step appears once.
    """

    def __init__(self, run_dir: str | Path, enabled: bool, resumed_grpo_step: int | None = None):
        self.path = Path(run_dir) / "samples.jsonl"
        self.enabled = enabled
        if enabled and resumed_grpo_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if _step_of(line) is not None and _step_of(line) <= resumed_grpo_step]
            files.write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, rows: list[dict]) -> None:
        if not self.enabled or not rows:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def _step_of(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a kill
        return None
