"""python -m r1vl.run.plot: a PNG with the run's curves, from a metrics JSONL."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from r1vl.run.plot import PANELS, panels_of, plot_run, read_metrics, series, smooth, with_before


def write_run(run_dir, steps=12):
    records = [{"stage": "sft", "step": s, "loss": 2.0 / (s + 1)} for s in range(3)]
    for s in range(steps):
        records.append({"stage": "grpo", "step": s, "time": 1e9 + s, "reward": 0.5 + 0.1 * s,
                        "step_rar": 0.05 * s, "step_rvr": 0.4, "accuracy": 0.1 * s, "kl": 0.001 * s,
                        "completion_len": 40 + s, "tokens_per_s": 1000.0, "skipped": False, "rewards": "all"})
        if s % 5 == 4:  # --eval_every 5
            records[-1].update(eval_reward=0.6 + 0.05 * s, eval_accuracy=0.2, eval_step_rvr=0.5)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write('{"stage": "grpo", "step": 99, "rew')  # a run killed mid-line


def test_png_is_written_and_not_blank(tmp_path, capsys):
    write_run(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"before": {"reward": 0.3, "accuracy": 0.05}}))
    out = plot_run(tmp_path)
    assert out == tmp_path / "metrics.png" and out.stat().st_size > 10_000
    pixels = np.asarray(Image.open(out).convert("L"), dtype=np.float32)
    assert pixels.shape[0] > 500 and pixels.std() > 10  # five panels of curves, not an empty canvas
    assert "not a JSON record, skipped" in capsys.readouterr().err


def test_series_keep_grpo_records_and_numbers_only(tmp_path):
    write_run(tmp_path, steps=5)
    data = series(read_metrics(tmp_path / "metrics.jsonl"))
    assert "loss" not in data and "skipped" not in data and "time" not in data and "rewards" not in data
    assert data["reward"] == ([0, 1, 2, 3, 4], [0.5, 0.6, 0.7, 0.8, 0.9])
    assert data["eval_reward"] == ([4], [0.8])


def test_smooth_is_tensorboards_debiased_exponential_average():
    """The outside producer: pandas' adjusted EWM is the same estimator as TensorBoard's
    debiased smoothing (weights w**k over the points so far, normalised)."""
    pandas = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    values = list(rng.normal(1.0, 0.3, 57))
    for span in (3, 5, 12):
        want = pandas.Series(values).ewm(span=span, adjust=True).mean().tolist()
        assert np.allclose(smooth(values, span=span), want, rtol=0, atol=1e-12)
    assert smooth(values) == smooth(values, span=5)  # default: a tenth of the series
    assert smooth([]) == []


def test_the_last_point_is_not_one_noisy_step():
    """A flat curve that ends on one bad step (seed 7's "collapse" at step 150): the
    smoothed end stays near the plateau, where a window shrinking to one point gave the step."""
    values = [1.3] * 149 + [1.05]
    out = smooth(values)
    assert out[-1] > 1.25 and out[-1] != values[-1]
    noisy = [float(i % 2) for i in range(40)]  # 0, 1, 0, 1, ...: flat once warmed up
    assert all(abs(v - 0.5) <= 0.2 for v in smooth(noisy, span=5)[5:])


def test_eval_points_start_with_the_before_evaluation():
    data = {"eval_reward": ([20, 40], [0.9, 1.1]), "reward": ([1, 2], [0.5, 0.6])}
    out = with_before(data, {"before": {"reward": 0.4, "accuracy": 0.1}, "after": {"reward": 1.1}})
    assert out["eval_reward"] == ([0, 20, 40], [0.4, 0.9, 1.1])
    assert out["eval_accuracy"] == ([0], [0.1])
    assert out["reward"] == data["reward"] and with_before(data, {}) == data


def test_every_reward_component_has_its_own_panel():
    keys = [key for _, keys in PANELS for key in keys]
    for component in ("reward", "accuracy", "step_rar", "step_rvr", "key_step_match"):
        assert sum(component in keys for _, keys in PANELS) == 1, component
    assert len(keys) == len(set(keys))


def test_command_line_and_errors(tmp_path):
    write_run(tmp_path)
    result = subprocess.run([sys.executable, "-m", "r1vl.run.plot", str(tmp_path), "--out", str(tmp_path / "x.png")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "x.png").stat().st_size > 10_000
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl in"):
        plot_run(tmp_path / "missing")
    (tmp_path / "other.jsonl").write_text(json.dumps({"step": 0, "loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="none of the metrics to plot"):
        plot_run(tmp_path, metrics_file="other.jsonl")


def test_each_reward_function_has_its_own_panel(tmp_path):
    write_run(tmp_path, steps=4)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()[:-1]  # without the cut line
    records = [json.loads(line) for line in lines]
    for r in records:
        if r["stage"] == "grpo":
            r.update({"rewards/steprar": 0.2, "rewards/fmt": float("nan") if r["step"] == 1 else 0.5})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = series(read_metrics(tmp_path / "metrics.jsonl"))
    assert data["rewards/fmt"] == ([0, 2, 3], [0.5, 0.5, 0.5])  # a step with no opinion: no point
    panels = panels_of(data)
    assert panels[-2:] == [("reward function steprar (mean)", ["rewards/steprar"]),
                           ("reward function fmt (mean)", ["rewards/fmt"])]
    assert len(panels) == len(panels_of({k: v for k, v in data.items() if not k.startswith("rewards/")})) + 2
    assert plot_run(tmp_path).stat().st_size > 10_000
