"""Draw a run's curves from its metrics JSONL to one PNG: `python -m r1vl.plot RUN_DIR`.

Panels: the reward and each of its components, accuracy, KL to the reference, completion
length, throughput. A panel shows every numeric series whose name matches it (so new
metrics appear without changes here) and is left out when a run logged none of them.
Only the StepGRPO records are drawn when the file also holds SFT warm-up records.
"""
import argparse
import json
import math
import sys
from pathlib import Path

PANELS = [  # (title, predicate on a metric name)
    ("reward", lambda k: k.startswith(("reward", "step_rar", "step_rvr"))),
    ("accuracy", lambda k: "accuracy" in k and not k.startswith("reward")),
    ("KL to the reference", lambda k: k == "kl" or k.startswith("kl")),
    ("completion length (tokens)", lambda k: "completion_len" in k),
    ("throughput (tokens/s)", lambda k: k.startswith("tokens_per_s")),
]


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


def plot_run(run_dir: Path, out: Path | None = None, metrics_file: str = "metrics.jsonl") -> Path:
    """Write RUN_DIR/metrics.png (or `out`) and return its path."""
    import matplotlib
    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    path = Path(run_dir) / metrics_file
    if not path.is_file():
        raise FileNotFoundError(f"no {metrics_file} in {run_dir}")
    data = series(read_metrics(path))
    panels = [(title, sorted(k for k in data if match(k))) for title, match in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        raise ValueError(f"{path} holds none of the metrics to plot (reward, accuracy, kl, completion length, tokens/s)")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], panels):
        for key in keys:
            xs, ys = data[key]
            ax.plot(xs, ys, label=key, marker="." if len(xs) < 50 else None)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(str(run_dir), fontsize=9)
    fig.tight_layout()
    out = Path(out) if out is not None else Path(run_dir) / "metrics.png"
    fig.savefig(out, dpi=110)
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
