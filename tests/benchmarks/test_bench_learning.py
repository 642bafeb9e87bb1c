"""bench_learning / bench_ablation without training: runs are found by their options, the
tables hold what results.json says, and unfinished runs are named, never silently dropped."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_ablation  # noqa: E402
import bench_learning  # noqa: E402
from _runs import Run, finished  # noqa: E402

from r1vl.config import parse_config, to_dict  # noqa: E402


def _fake_run(root, label, seed, options, before, after):
    """A finished run directory: config.json as train.py writes it, results.json."""
    run = Run(label, seed, options)
    run_dir = run.run_dir(root)
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(parse_config(run.argv(root)))))
    (run_dir / "results.json").write_text(json.dumps({
        "before": {"reward": before[0], "accuracy": before[1], "step_rvr": 0.1},
        "after": {"reward": after[0], "accuracy": after[1], "step_rvr": 0.5}}))
    return run


def test_learning_table_from_finished_runs(tmp_path, capsys):
    _fake_run(tmp_path, "default", 0, [], (0.2, 0.08), (0.7, 0.21))
    _fake_run(tmp_path, "sdpa_masked", 0, ["--attention", "sdpa_masked"], (0.2, 0.08), (0.45, 0.2))
    # Same label, other options: not the run asked for, so not counted.
    _fake_run(tmp_path, "float64_softmax", 0, ["--loss_softmax", "float64", "--lr", "1e-4"], (0.2, 0.1), (1, 1))
    out = tmp_path / "learning.md"
    bench_learning.main(["--collect", "--runs", str(tmp_path), "--seeds", "0", "--out", str(out)])
    text = out.read_text()
    assert "| default | 0 | 0.200 -> 0.700 | +0.500 | 0.080 -> 0.210 | +0.130 | yes |" in text
    assert "| sdpa_masked | 0 | 0.200 -> 0.450 | +0.250 |" in text and "| NO |" in text
    assert "1/2 runs clear the bar" in text and "Not run: float64_softmax seed 0." in text
    assert "python benchmarks/bench_learning.py --collect" in text
    assert str(tmp_path) in capsys.readouterr().out  # the run directories are named on the console


def test_ablation_table_uses_the_warm_up_of_the_default_run(tmp_path):
    default = _fake_run(tmp_path, "default", 1, [], (0.3, 0.1), (0.9, 0.3))
    _fake_run(tmp_path, "rewards-accuracy", 1, ["--reward_funcs", "accuracy"], (0.3, 0.1), (0.5, 0.2))
    done, missing = finished([default, Run("rewards-steprar", 1, ["--reward_funcs", "steprar"])], tmp_path)
    assert done == [default] and [r.label for r in missing] == ["rewards-steprar"]
    out = tmp_path / "ablation.md"
    bench_ablation.main(["--collect", "--runs", str(tmp_path), "--seeds", "1", "--out", str(out)])
    text = out.read_text()
    assert "| warm-up only | 0.100 ± 0.000 (s1 0.100) | 0.300 ± 0.000 (s1 0.300) |" in text
    assert "| outcome only (accuracy) | 0.200 ± 0.000 (s1 0.200) | 0.500 ± 0.000 (s1 0.500) |" in text
    assert "| StepGRPO (all) | 0.300 ± 0.000 (s1 0.300) | 0.900 ± 0.000 (s1 0.900) |" in text
    assert "rewards-steprar seed 1" in text and "StepRAR (accuracy + key steps) |" not in text
