"""benchmarks/gpu_session.sh in its dry mode, on the CPU: the preflight runs (versions, one
compiled decode step, backend eager), every step's files exist, its pytest selection collects
without error and its scripts take the options given; every log lands in $OUT."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["preflight", "gpu_tests", "loss_kernels", "rollout", "update", "trainer"]


def _run(out: Path, script: Path):
    # Not an xdist worker's variables: pytest-benchmark reads PYTEST_XDIST_WORKER and then
    # refuses the loss step's --benchmark-only, as it would not on the GPU machine.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(GPU_SESSION_DRY="1", OUT=str(out), PYTHON=sys.executable)
    return subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # about a minute on two idle cores: the GPU tests' collection, four --help
def test_dry_session_checks_every_step(tmp_path):
    done = _run(tmp_path / "out", ROOT / "benchmarks" / "gpu_session.sh")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split("\t") for line in (tmp_path / "out" / "steps.tsv").read_text().splitlines()]
    assert [r[0] for r in rows] == STEPS
    assert rows[0][1] == "0" and all(r[1] == "dry" for r in rows[1:]), rows
    for name in STEPS:
        assert (tmp_path / "out" / f"{name}.log").stat().st_size > 0, name
    preflight = (tmp_path / "out" / "preflight.log").read_text()
    assert "transformers 5." in preflight and "logits = eager's" in preflight
    assert "collected" in (tmp_path / "out" / "loss_kernels.log").read_text()

