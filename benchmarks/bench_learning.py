"""Does the built-in run learn whatever the seed and the numerics? The robustness table.

    python benchmarks/bench_learning.py                      # seeds 0-4 x three numerics, 2 runs at a time
    python benchmarks/bench_learning.py --seeds 0 1 --variants default --jobs 1
    python benchmarks/bench_learning.py --reuse ...          # read back runs already finished
    python benchmarks/bench_learning.py --collect            # tabulate the finished ones only, run nothing

Runs `python train.py --seed S` (the built-in configuration, TINY_DEFAULTS in r1vl/config.py)
for every seed and numerics variant:
  - default:           as `make run`;
  - sdpa_masked: one attention call with a block-diagonal mask instead of the CPU's call
                 per packed segment (`--attention sdpa_masked`), about 1e-7 away from default;
  - float64_softmax:   the GRPO loss's softmax in float64 (`--loss_softmax float64`).
Each run is its own random trajectory once the numerics differ, so the variants are extra
draws of the same experiment. The bar: every run raises the held-out mean reward
by at least 0.3 and the accuracy by at least 0.1 from before StepGRPO to after it.

Prints a table and appends it, with the command, to benchmarks/results/learning.md (--out).
Extra train.py options go after `--`, e.g. `-- --num_steps 40`; they apply to every run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import ROOT, Run, add_run_arguments, append, execute, finished, header  # noqa: E402

VARIANTS = {
    "default": [],
    "sdpa_masked": ["--attention", "sdpa_masked"],
    "float64_softmax": ["--loss_softmax", "float64"],
}
BAR = {"reward": 0.3, "accuracy": 0.1}


def table(runs: list[Run]) -> str:
    lines = ["| numerics | seed | held-out reward before -> after | gain | accuracy before -> after | gain | "
             "clears +0.3 / +0.1 | minutes (shared cores) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        b, a = run.result["before"], run.result["after"]
        gains = {k: a[k] - b[k] for k in BAR}
        ok = all(gains[k] >= BAR[k] for k in BAR)
        minutes = f"{run.result['seconds'] / 60:.1f}" if "seconds" in run.result else "?"
        lines.append(f"| {run.label} | {run.seed} | {b['reward']:.3f} -> {a['reward']:.3f} | "
                     f"{gains['reward']:+.3f} | {b['accuracy']:.3f} -> {a['accuracy']:.3f} | "
                     f"{gains['accuracy']:+.3f} | {'yes' if ok else 'NO'} | {minutes} |")
    return "\n".join(lines)


def summary(runs: list[Run]) -> str:
    gains = {k: [r.result["after"][k] - r.result["before"][k] for r in runs] for k in BAR}
    passed = sum(all(r.result["after"][k] - r.result["before"][k] >= BAR[k] for k in BAR) for r in runs)
    parts = [f"{passed}/{len(runs)} runs clear the bar."]
    for k in BAR:
        spread = statistics.stdev(gains[k]) if len(gains[k]) > 1 else 0.0
        parts.append(f"{k} gain: min {min(gains[k]):+.3f}, mean {statistics.mean(gains[k]):+.3f} "
                     f"(std {spread:.3f}).")
    return " ".join(parts)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    add_run_arguments(parser, [0, 1, 2, 3, 4], ROOT / "benchmarks" / "results" / "learning.md",
                      "run nothing: tabulate the runs that finished, and name the ones that did not")
    args = parser.parse_args(argv)
    runs = [Run(variant, seed, VARIANTS[variant] + extra) for variant in args.variants for seed in args.seeds]
    missing = []
    if args.collect:
        runs, missing = finished(runs, args.runs)
        runs = execute(runs, args.runs, args.jobs, reuse=True)  # reads them back
    else:
        runs = execute(runs, args.runs, args.jobs, args.reuse)
    if not runs:
        raise SystemExit(f"no finished runs under {args.runs}")
    parts = [table(runs), summary(runs)]
    if missing:
        parts.append("Not run: " + ", ".join(f"{r.label} seed {r.seed}" for r in missing) + ".")
    text = "\n\n".join(parts)
    print(text)
    command = ["benchmarks/bench_learning.py", *(argv if argv else []), *(["--", *extra] if extra else [])]
    append(args.out, "## Built-in run: held-out gains over seeds and numerics\n\n" + header(command) + "\n" + text)
    print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
