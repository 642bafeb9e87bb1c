"""The loss-kernel benchmark suite (benchmarks/test_bench_*.py) keeps working: its CPU mode runs
every case once, untimed, in a pytest of its own (`make test` runs under xdist, and benchmarks
are collected from benchmarks/, not tests/)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_mode_runs_every_case_once():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTEST_XDIST_WORKER")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "kernels"), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-k", "cpu", "--benchmark-disable", "-q",
                          "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    last = out.stdout.strip().splitlines()[-1]
    assert "passed" in last and "failed" not in last and "error" not in last, last
