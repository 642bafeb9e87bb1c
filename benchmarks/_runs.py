"""Run `train.py` (the built-in configuration plus some options) as subprocesses, a few at a
time, and read back their held-out evaluations: what bench_learning.py and bench_ablation.py
share.

Each run gets one thread (OMP_NUM_THREADS=1): the built-in run is deterministic then, and two
runs on two cores do not fight over them. A run whose RUN_DIR already holds results.json from
the same options is read back instead of run again (--reuse), so an interrupted benchmark
continues where it stopped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    """One train.py run: a label for the tables, its seed and the options beyond the defaults."""

    label: str
    seed: int
    options: list[str] = field(default_factory=list)
    result: dict = field(default_factory=dict)  # results.json, plus "seconds"

    def run_dir(self, root: Path) -> Path:
        return root / f"{self.label}-seed{self.seed}"

    def argv(self, root: Path) -> list[str]:
        return ["--seed", str(self.seed), "--run_dir", str(self.run_dir(root)), "--progress", "false",
                "--save_final", "false", "--save_every", "0", *self.options]


def add_run_arguments(parser: argparse.ArgumentParser, seeds: list[int], out: Path, collect_help: str) -> None:
    """The options both run-matrix benchmarks take: seeds, parallel jobs, where runs go,
    reusing or only collecting finished runs, the results file."""
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench", help="where the run directories go")
    parser.add_argument("--reuse", action="store_true", help="read back runs that finished with the same options")
    parser.add_argument("--collect", action="store_true", help=collect_help)
    parser.add_argument("--out", type=Path, default=out)


def _same_options(run_dir: Path, argv: list[str]) -> bool:
    """Whether RUN_DIR's finished run was started with these options (config.json)."""
    config_path, results_path = run_dir / "config.json", run_dir / "results.json"
    if not (config_path.is_file() and results_path.is_file()):
        return False
    sys.path.insert(0, str(ROOT))
    from r1vl.config import parse_config, to_dict

    return json.loads(config_path.read_text()) == to_dict(parse_config(argv))


def _wall_seconds(run_dir: Path) -> float:
    """A finished run's wall time when it was not started by execute(): from the config
    file's writing (the run's start) to results.json's (its end)."""
    return (run_dir / "results.json").stat().st_mtime - (run_dir / "config.json").stat().st_mtime


def finished(runs: list[Run], root: Path) -> tuple[list[Run], list[Run]]:
    """(runs that finished with their options under root, the others), without running any."""
    done = [run for run in runs if _same_options(run.run_dir(root), run.argv(root))]
    return done, [run for run in runs if run not in done]


def execute(runs: list[Run], root: Path, jobs: int, reuse: bool) -> list[Run]:
    """Run (or read back) every run, `jobs` at a time; fills run.result. A failed run stops
    the benchmark with its stderr (a table with a hole would read as a result)."""
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)

    def one(run: Run) -> Run:
        run_dir, argv = run.run_dir(root), run.argv(root)
        if reuse and _same_options(run_dir, argv):
            run.result = json.loads((run_dir / "results.json").read_text())
            run.result.setdefault("seconds", _wall_seconds(run_dir))
            print(f"[reused] {run.label} seed {run.seed}: {run_dir}", flush=True)
            return run
        start = time.perf_counter()
        print(f"[start] {run.label} seed {run.seed}: train.py {' '.join(argv)}", flush=True)
        log = run_dir.with_suffix(".log")
        with open(log, "w") as out:
            proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise SystemExit(f"{run.label} seed {run.seed} failed (exit {proc.returncode}); see {log}")
        run.result = json.loads((run_dir / "results.json").read_text())
        run.result["seconds"] = time.perf_counter() - start
        (run_dir / "results.json").write_text(json.dumps(run.result, indent=2) + "\n")
        print(f"[done] {run.label} seed {run.seed} in {run.result['seconds']:.0f} s", flush=True)
        return run

    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        return list(pool.map(one, runs))


def header(command: list[str]) -> str:
    """Markdown lines naming when, at which commit and with which command a table was made."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{when}, commit {commit}, one thread per run:\n\n    python {' '.join(command)}\n"


def append(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text.rstrip() + "\n\n")
