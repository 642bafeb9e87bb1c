"""Draw a run's curves from its metrics JSONL to one PNG: `python -m r1vl.run.plot RUN_DIR`.

One panel per quantity: the reward and, separately, each of its components (accuracy,
StepRAR, StepRVR, the key-step match and the share of completions that give an answer), then
KL to the reference, completion length and throughput, then each --reward_funcs function's mean
(rewards/<name>). The per-step training values are drawn faintly, with an exponential average
over them (a step's reward is a mean over one batch, too noisy to read alone) that looks back
only, so that a curve's last point is not one noisy step. Held-out evaluations (`eval_<name>`
in the metrics, from `--eval_every`, and the "before" evaluation in RUN_DIR/results.json,
drawn at step 0) are points on the panel of the same quantity. A panel is left out when a run
logged none of its metrics. Only the StepGRPO records are drawn when the file also holds SFT
warm-up records.
"""
import argparse
import json
import math
import sys
from pathlib import Path

PANELS = [  # (title, metric names); "eval_<name>" points go on the panel of <name>
    ("reward (StepRAR + StepRVR)", ("reward",)),
    ("accuracy", ("accuracy",)),
    ("StepRAR: accuracy + alpha x key-step match", ("step_rar",)),
    ("StepRVR: complete and logical reasoning", ("step_rvr",)),
    ("key-step match; completions with an answer", ("key_step_match", "has_answer")),
    ("KL to the reference", ("kl",)),
    ("completion length (tokens)", ("completion_len",)),
    ("throughput (tokens/s)", ("tokens_per_s",)),
]
# Then one panel per reward function (--reward_funcs), from its rewards/<name> metric.
FUNCTION_PREFIX = "rewards/"


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics JSONL file; a line that is not JSON (a run killed while
    writing it) is reported and skipped, never silently."""
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"{path}:{lineno}: not a JSON record, skipped", file=sys.stderr)
    return records


def series(records: list[dict]) -> dict[str, tuple[list, list]]:
    """name -> (steps, values) for every finite numeric metric."""
    if any(r.get("stage") == "grpo" for r in records):
        records = [r for r in records if r.get("stage") == "grpo"]
    out: dict[str, tuple[list, list]] = {}
    for i, r in enumerate(records):
        step = r.get("step", i)
        for key, value in r.items():
            if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                xs, ys = out.setdefault(key, ([], []))
                xs.append(step)
                ys.append(value)
    return out


def smooth(values: list[float], span: int | None = None) -> list[float]:
    """Debiased exponential moving average, TensorBoard's scalar smoothing: each point is the
    weighted mean of itself and the points before it, weights decaying by w = 1 - 2/(span+1)
    per step (span: about a tenth of the series, at least 3). It looks back only, so the last
    point averages the last few steps rather than being the last step alone, as a centred
    window that shrinks at the ends makes it; dividing by 1 - w**(i+1) removes the pull
    towards 0 of the first points.

    values: the per-step values, in step order. Returns a list of the same length.
    """
    n = len(values)
    if span is None:
        span = max(3, n // 10)
    w = 1.0 - 2.0 / (span + 1)
    out, accum, norm = [], 0.0, 0.0
    for v in values:
        accum = w * accum + (1.0 - w) * v
        norm = w * norm + (1.0 - w)  # = 1 - w**(i+1)
        out.append(accum / norm)
    return out


def with_before(data: dict[str, tuple[list, list]], results: dict) -> dict[str, tuple[list, list]]:
    """The eval_<name> series with results.json's "before" evaluation added at step 0."""
    before = results.get("before") or {}
    out = dict(data)
    for key, value in before.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs, ys = out.get(f"eval_{key}", ([], []))
            out[f"eval_{key}"] = ([0, *xs], [value, *ys])
    return out


def panels_of(data: dict[str, tuple[list, list]]) -> list[tuple[str, list[str]]]:
    """(title, metric names) of each panel to draw: PANELS' with data, then one per reward
    function (rewards/<name>), in the order the run logged them."""
    functions = [(f"reward function {k[len(FUNCTION_PREFIX):]} (mean)", (k,))
                 for k in data if k.startswith(FUNCTION_PREFIX)]
    panels = [(title, [k for k in keys if k in data or f"eval_{k}" in data]) for title, keys in PANELS + functions]
    return [(title, keys) for title, keys in panels if keys]


def plot_run(run_dir: Path, out: Path | None = None, metrics_file: str = "metrics.jsonl") -> Path:
    """Write RUN_DIR/metrics.png (or `out`) and return its path."""
    import matplotlib
    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    path = Path(run_dir) / metrics_file
    if not path.is_file():
        raise FileNotFoundError(f"no {metrics_file} in {run_dir}")
    data = series(read_metrics(path))
    results_path = Path(run_dir) / "results.json"
    if results_path.is_file():
        data = with_before(data, json.loads(results_path.read_text()))
    panels = panels_of(data)
    if not panels:
        raise ValueError(f"{path} holds none of the metrics to plot "
                         "(reward, accuracy, kl, completion length, tokens/s)")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.3 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], panels):
        for colour, key in zip(("C0", "C1", "C2"), keys):
            if key in data:
                xs, ys = data[key]
                ax.plot(xs, ys, color=colour, alpha=0.3, linewidth=0.8, marker="." if len(xs) < 30 else None)
                ax.plot(xs, smooth(ys), color=colour, linewidth=1.8, label=f"{key} (exponential average)")
            if f"eval_{key}" in data:
                xs, ys = data[f"eval_{key}"]
                ax.plot(xs, ys, color=colour, linestyle=":", marker="o", markersize=6,
                        markeredgecolor="black", label=f"{key}, held-out prompts")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("StepGRPO step")
    fig.suptitle(str(run_dir), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / fig.get_figheight()))  # room for the title
    out = Path(out) if out is not None else Path(run_dir) / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Plot a run's metrics JSONL to a PNG.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default RUN_DIR/metrics.png)")
    parser.add_argument("--metrics-file", default="metrics.jsonl")
    args = parser.parse_args(argv)
    print(plot_run(args.run_dir, args.out, args.metrics_file))


if __name__ == "__main__":
    main()
