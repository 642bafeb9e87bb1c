"""Sample completions: rows with every reward function's value and the advantage, in
samples.jsonl (rank 0), rewound on resume; the console's short form."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from r1vl.data.records import Example
from r1vl.rewards import RewardBreakdown
from r1vl.rewards.advantages import step_advantages
from r1vl.rewards.scorer import StepRewards
from r1vl.run.metrics import MetricsLog
from r1vl.run.samples import console_lines, sample_rows


def step_of(P=3, G=2):
    examples = [Example(Path(f"img{p}.png"), f"question {p}", "s", source=f"d.jsonl:{p}") for p in range(P)]
    samples = SimpleNamespace(prompts=[SimpleNamespace(example=e) for e in examples], group_size=G,
                              texts=[f"completion {i}\nline two" for i in range(P * G)])
    N = P * G
    f = np.arange(N, dtype=np.float32) / 10
    breakdown = RewardBreakdown(total=f, accuracy=(f > 0.2).astype(np.float32), step_rar=f, step_rvr=np.ones(N, np.float32),
                                key_step_match=np.zeros(N, np.float32), has_answer=np.ones(N, bool),
                                undecided=np.zeros(N, bool))
    per_function = torch.tensor(np.stack([f, np.ones(N, np.float32)], 1))
    per_function[1, 1] = float("nan")  # no opinion on completion 1
    total = per_function.nan_to_num().sum(1)
    rewards = StepRewards(breakdown, ("accuracy", "format"), per_function, total)
    advantages = step_advantages(total, G, "group", lambda x: x)
    return samples, rewards, advantages


def test_rows_hold_all_g_completions_of_the_first_prompts_with_their_rewards_and_advantage():
    samples, rewards, advantages = step_of()
    rows = sample_rows(10, samples, rewards, advantages, num_prompts=2)
    assert len(rows) == 4 and [(r["prompt_index"], r["completion_index"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert rows[3]["prompt"] == "question 1" and rows[3]["completion"] == "completion 3\nline two"
    assert rows[3]["rewards/accuracy"] == rewards.per_function[3, 0].item() and rows[3]["rewards/format"] == 1.0
    assert rows[1]["rewards/format"] is None  # NaN -> null in JSON
    assert rows[3]["reward"] == rewards.total[3].item() and rows[3]["advantage"] == advantages[3].item()
    assert rows[0]["advantage"] > 0 > rows[1]["advantage"]  # 1.0 vs 0.1 (format had no opinion on 1)
    json.dumps(rows, allow_nan=False)


def test_samples_jsonl_is_appended_by_rank_0_and_rewound_on_resume(tmp_path):
    samples, rewards, advantages = step_of()
    log = MetricsLog(tmp_path, True, tensorboard=False)
    for step in (10, 20, 30):
        log.log_samples(sample_rows(step, samples, rewards, advantages, 1), step)
    log.close()
    (tmp_path / "other").mkdir()
    other = MetricsLog(tmp_path / "other", False, tensorboard=False)
    other.log_samples(sample_rows(40, samples, rewards, advantages, 1), 40)
    assert not (tmp_path / "other" / "samples.jsonl").exists()  # not rank 0: nothing
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 10, 20, 20, 30, 30]
    MetricsLog(tmp_path, True, resumed_at=("grpo", 20), tensorboard=False).close()
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 10, 20, 20]


def test_console_short_form_is_one_line_per_completion():
    samples, rewards, advantages = step_of()
    lines = console_lines(sample_rows(10, samples, rewards, advantages, 1), width=60)
    assert len(lines) == 3 and lines[0] == "  sample step 10 prompt 0: question 0"
    assert lines[1].startswith("    g0 reward 1.000 adv +0.71 | ") and "completion 0 line two" in lines[1]
    assert all(len(line) <= 60 for line in lines[1:])
