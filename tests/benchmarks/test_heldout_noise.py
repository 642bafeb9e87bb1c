"""heldout_noise on a short tiny run: train.py's own evaluation, per size and seed, reproducible
for a seed, and refusing sizes the run does not hold out."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import heldout_noise  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(ROOT / "train.py"), "--progress", "false", "--run_dir", str(run_dir),
           "--sft_steps", "2", "--num_steps", "1", "--batch_size", "8", "--eval_prompts", "6",
           "--max_completion_length", "12", "--save_every", "0"]
    result = subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_each_size_and_seed_is_scored_and_a_seed_reproduces(tiny_run):
    results = heldout_noise.measure(tiny_run, tiny_run / "final", [(6, 1), (3, 2)], seeds=[4, 9, 4])
    assert sorted(results) == [(3, 2), (6, 1)]
    for evaluations in results.values():
        assert [e["seed"] for e in evaluations] == [4, 9, 4]
        for e in evaluations:
            assert 0 <= e["accuracy"] <= 1 and 0 <= e["step_rvr"] <= 1 and e["reward"] >= 0
        assert evaluations[0] == evaluations[2]  # the same seed draws the same samples


def test_a_size_beyond_the_held_out_prompts_is_refused(tiny_run):
    with pytest.raises(ValueError, match="holds out 6"):
        heldout_noise.measure(tiny_run, tiny_run / "final", [(7, 1)], seeds=[0, 1])


@pytest.mark.parametrize("text", ["128", "0x2", "ax1", "4x2x1"])
def test_bad_sizes_are_named(text):
    with pytest.raises(ValueError, match="PROMPTSxSAMPLES|at least one"):
        heldout_noise.parse_size(text)


def test_cli_prints_the_table(tiny_run, capsys):
    heldout_noise.main([str(tiny_run), "--sizes", "4x1", "--seeds", "0", "1"])
    out = capsys.readouterr().out
    assert "| 4 x 1 | reward |" in out and "| 4 x 1 | accuracy |" in out
    with pytest.raises(SystemExit):
        heldout_noise.main([str(tiny_run), "--seeds", "0"])
    assert "two or more" in capsys.readouterr().err


def test_each_evaluation_gets_the_last_prompts_its_samples_and_its_seed(tiny_run, monkeypatch):
    """The wiring, with the held-out evaluation recorded: a size takes the LAST prompts of the
    held-out records (those train.py scores), the samples per prompt and the seed reach it."""
    from r1vl.config import Config
    from r1vl.heldout import HeldOut
    from r1vl.run.setup import split_data

    calls = []

    def fake_evaluate(self, seed=None):
        calls.append(([e.source for e in self.examples], self.generations, seed))
        return {"reward": float(seed), "accuracy": 0.5, "step_rvr": 0.5}

    monkeypatch.setattr(HeldOut, "__call__", fake_evaluate)
    results = heldout_noise.measure(tiny_run, tiny_run / "final", [(4, 1), (2, 3)], seeds=[5, 6])
    cfg = Config.from_flat(json.loads((tiny_run / "config.json").read_text()))
    _, held_out = split_data(str(tiny_run / "synthetic" / "data.jsonl"), cfg.dataset,
                             cfg.evaluation.eval_prompts)
    sources = [e.source for e in held_out]  # "<file>:<record index>"
    assert calls == [(sources[-4:], 1, 5), (sources[-4:], 1, 6), (sources[-2:], 3, 5), (sources[-2:], 3, 6)]
    assert [e["reward"] for e in results[(2, 3)]] == [5.0, 6.0]
