"""The paper's reward ablation in miniature: what each step-wise reward adds on the synthetic task.

    python benchmarks/bench_ablation.py                      # 3 seeds x 4 reward sets, 2 runs at a time
    python benchmarks/bench_ablation.py --seeds 0 --reuse
    python benchmarks/bench_ablation.py --collect            # tabulate the finished runs only

R1-VL (Table 4, Qwen2-VL-7B, MathVista): warm-up only 61.2, +StepRAR 62.4, +StepRVR 61.9,
StepGRPO (both) 63.5. Here, on the built-in run (TINY_DEFAULTS), with the same warm-up and
the same number of StepGRPO steps for every setting:
  - warm-up only:      the policy StepGRPO starts from (the runs' "before" evaluation);
  - outcome only:      `--reward_funcs accuracy` (1 for a correct answer);
  - +StepRAR:          `--reward_funcs steprar` (accuracy + alpha x key-step match);
  - +StepRVR:          `--reward_funcs accuracy steprvr` (accuracy + the validity reward);
  - StepGRPO:          the default, `--reward_funcs steprar steprvr` (StepRAR + StepRVR).
Every setting is scored on the same held-out prompts with the full reward (StepRAR + StepRVR)
and the accuracy. The StepGRPO runs are bench_learning.py's "default" runs (same directory
names), so --reuse shares them.

Prints a table (mean and standard deviation over seeds, and each seed's value) and appends it,
with the command, to benchmarks/results/ablation.md (--out).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import ROOT, Run, add_run_arguments, append, execute, finished, header  # noqa: E402

SETTINGS = {  # label -> (run label, train.py options); None = the warm-up only ("before")
    "warm-up only": None,
    "outcome only (accuracy)": ("rewards-accuracy", ["--reward_funcs", "accuracy"]),
    "+StepRAR (accuracy + key steps)": ("rewards-steprar", ["--reward_funcs", "steprar"]),
    "+StepRVR (accuracy + validity)": ("rewards-steprvr", ["--reward_funcs", "accuracy", "steprvr"]),
    "StepGRPO (all)": ("default", []),
}


def _cell(pairs: list[tuple[int, float]]) -> str:
    values = [v for _, v in pairs]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    seeds = ", ".join(f"s{seed} {v:.3f}" for seed, v in pairs)
    return f"{statistics.mean(values):.3f} ± {spread:.3f} ({seeds})"


def table(by_setting: dict[str, list[tuple[int, dict]]]) -> str:
    """by_setting: setting -> [(seed, held-out evaluation), ...]."""
    lines = ["| setting | held-out accuracy: mean ± std (per seed) | held-out reward: mean ± std (per seed) |",
             "| --- | --- | --- |"]
    for name, evaluations in by_setting.items():
        lines.append(f"| {name} | {_cell([(s, e['accuracy']) for s, e in evaluations])} | "
                     f"{_cell([(s, e['reward']) for s, e in evaluations])} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, [0, 1, 2], ROOT / "benchmarks" / "results" / "ablation.md",
                      "run nothing: tabulate the finished runs (a setting lists the seeds it has)")
    args = parser.parse_args(argv)
    runs = {name: [Run(spec[0], seed, spec[1]) for seed in args.seeds]
            for name, spec in SETTINGS.items() if spec is not None}
    wanted = [run for group in runs.values() for run in group]
    missing = []
    if args.collect:
        wanted, missing = finished(wanted, args.runs)
    done = execute(wanted, args.runs, args.jobs, reuse=True if args.collect else args.reuse)
    by_run = {(r.label, r.seed): r.result for r in done}
    by_setting = {"warm-up only": [(s, by_run[("default", s)]["before"]) for s in args.seeds
                                   if ("default", s) in by_run]}
    by_setting.update({name: [(s, by_run[(spec[0], s)]["after"]) for s in args.seeds if (spec[0], s) in by_run]
                       for name, spec in SETTINGS.items() if spec is not None})
    by_setting = {name: evaluations for name, evaluations in by_setting.items() if evaluations}
    # Every setting starts from the same warm-up; say so if the runs disagree on it.
    notes = []
    for name, spec in SETTINGS.items():
        if spec is not None:
            for s in args.seeds:
                if (spec[0], s) in by_run and ("default", s) in by_run and \
                        by_run[(spec[0], s)]["before"] != by_run[("default", s)]["before"]:
                    notes.append(f"note: {name} seed {s} started from a different warm-up evaluation")
    if missing:
        notes.append("Not run: " + ", ".join(f"{r.label} seed {r.seed}" for r in missing) + ".")
    text = "\n".join([table(by_setting), "", *notes]).rstrip()
    print(text)
    append(args.out, "## Reward ablation on the built-in run (after StepGRPO, held-out prompts)\n\n"
           + header(["benchmarks/bench_ablation.py", *argv]) + "\n" + text)
    print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
