"""MetricsLog: JSONL records, per-stage TensorBoard runs, and the rewind of a resumed run."""
import math

from jsonl_records import read_jsonl

from r1vl.run.metrics import MetricsLog


def _steps(path):
    """(stage, step) of every record in a metrics.jsonl."""
    return [(r["stage"], r["step"]) for r in read_jsonl(path)]


def test_resume_drops_the_records_written_after_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path, enabled=True)
    for stage, steps in (("sft", 3), ("grpo", 4)):
        for step in range(1, steps + 1):
            log.log({"stage": stage, "step": step, "loss": 0.5})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "grpo", "step": 5, "lo')  # the line a SIGKILL cut short
    log = MetricsLog(tmp_path, enabled=True, resumed_at=("grpo", 2))
    log.log({"stage": "grpo", "step": 3, "loss": 0.25})
    log.close()
    assert _steps(tmp_path / "metrics.jsonl") == [("sft", 1), ("sft", 2), ("sft", 3), ("grpo", 1), ("grpo", 2),
                                                    ("grpo", 3)]
    # Resumed inside the warm-up: every GRPO record goes too.
    MetricsLog(tmp_path, enabled=True, resumed_at=("sft", 1)).close()
    assert _steps(tmp_path / "metrics.jsonl") == [("sft", 1)]


def test_each_stage_is_its_own_tensorboard_run(tmp_path):
    log = MetricsLog(tmp_path, enabled=True)
    log.log({"stage": "sft", "step": 1, "loss": 1.0})
    log.log({"stage": "grpo", "step": 1, "reward": 0.5})
    log.close()
    for stage in ("sft", "grpo"):
        assert any((tmp_path / "tensorboard" / stage).glob("events.out.tfevents.*")), stage


def test_other_ranks_write_nothing(tmp_path):
    log = MetricsLog(tmp_path, enabled=False)
    log.log({"stage": "grpo", "step": 1})
    log.close()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_undecided_fraction_is_on_the_console_and_warned_once(capsys):
    from r1vl.run.metrics import UndecidedWarning, console_line

    assert "undecided 0.05" in console_line({"stage": "grpo", "step": 3, "reward": 1.0, "undecided": 0.05})
    warn = UndecidedWarning(threshold=0.03)
    assert [warn(f, step) for step, f in enumerate([0.0, 0.03, 0.05, 0.5], 1)] == [False, False, True, False]
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "step 3" in err and "5.0%" in err and "timeout_s" in err


def test_reward_function_means_skip_no_opinion_like_trl():
    """rewards/<name> is TRL's nanmean of the function's rewards; unscorable is the share no
    function had an opinion on; reward_weighted the mean of the weighted total."""
    from types import SimpleNamespace

    import torch

    from r1vl.rewards.functions import weighted_total
    from r1vl.run.metrics import reward_function_metrics

    nan = float("nan")
    per_function = torch.tensor([[1.0, nan], [0.0, 2.0], [1.0, nan], [nan, nan]])
    total = weighted_total(per_function, torch.tensor([1.0, 0.5]))
    rewards = SimpleNamespace(names=("steprar", "fmt"), per_function=per_function, total=total)
    out = reward_function_metrics(rewards, SimpleNamespace(device=torch.device("cpu")))
    assert out == {"rewards/steprar": 2 / 3, "rewards/fmt": 2.0, "reward_weighted": (1 + 1 + 1) / 3,
                   "unscorable": 0.25}
    none = SimpleNamespace(names=("fmt",), per_function=torch.full((2, 1), nan), total=torch.full((2,), nan))
    out = reward_function_metrics(none, SimpleNamespace(device=torch.device("cpu")))
    assert math.isnan(out["rewards/fmt"]) and out["unscorable"] == 1.0
