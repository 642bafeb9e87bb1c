"""Experiment trackers from one option: --report_to tensorboard,wandb,mlflow,swanlab (or all, none).

    trackers = open_trackers(cfg, run_dir, resuming=bool(resume))  # rank 0 only; [] elsewhere
    MetricsLog(..., trackers=trackers)   # every metrics.jsonl record goes to each tracker too
    tracker.log_samples(rows, step)      # r1vl.run.samples rows: a table, with the images

The libraries are called directly, not through accelerate's tracking wrappers: this trainer
has no Accelerator (the wrappers consult accelerate's own process state for the main
process), and what the issue needs is in the libraries' own calls: wandb's run id and
`resume`, MLflow's run id through MlflowClient (no global active run), wandb.Table and MLflow
artifacts for the sample table. Each adapter is a few lines; TensorBoard's scalars stay in
r1vl.run.metrics.MetricsLog as before.

Metric names: `<stage>/<metric>` (sft/loss, grpo/reward, grpo/eval_reward, grpo/rewards/<name>),
so that the warm-up and StepGRPO, whose steps both start at 1, are kept apart: in wandb each
stage has its own step axis (define_metric with `<stage>/step`), in MLflow each key has its
own history. The resolved config goes in once as hyperparameters. The tracker run ids are kept
in RUN_DIR/trackers.json so that `--resume` continues the same tracker run.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path

TRACKERS = ("tensorboard", "wandb", "mlflow", "swanlab")
# The package each tracker imports and the extra that installs it.
PACKAGES = {"tensorboard": ("tensorboard", "train"), "wandb": ("wandb", "trackers"),
            "mlflow": ("mlflow", "trackers"), "swanlab": ("swanlab", "swanlab")}
IDS_FILE = "trackers.json"


def parse_report_to(value: str) -> tuple[str, ...]:
    """The trackers of a --report_to value, in TRACKERS' order. Raises ValueError for an
    unknown name, and for a tracker whose package is not installed (naming the extra), so the
    run stops at start-up, before the model loads. TensorBoard stays optional, as before: its
    event files are written when it is installed."""
    names = {n.strip() for n in value.split(",") if n.strip()}
    unknown = names - {*TRACKERS, "none", "all"}
    if unknown:
        raise ValueError(f"--report_to: unknown tracker(s) {sorted(unknown)}; choose from "
                         f"{', '.join(('none', *TRACKERS, 'all'))}, comma-separated")
    if "none" in names and len(names) > 1:
        raise ValueError(f"--report_to none cannot be combined with other trackers, got {value!r}")
    chosen = TRACKERS if "all" in names else tuple(t for t in TRACKERS if t in names)
    for name in chosen:
        package, extra = PACKAGES[name]
        if name != "tensorboard" and importlib.util.find_spec(package) is None:
            raise ValueError(f"--report_to {name}: the {package} package is not installed; "
                             f"install the '{extra}' extra: pip install '.[{extra}]'")
    return chosen


def flat_config(cfg) -> dict:
    """The resolved config (r1vl.config.Config) as {option: int/float/bool/str}, flat as on the
    command line; lists joined by spaces."""
    out = {}
    for key, value in cfg.flat().items():
        out[key] = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return out


def open_trackers(cfg, run_dir: Path, enabled: bool, resuming: bool) -> list:
    """The wandb / mlflow / swanlab trackers --report_to asks for (TensorBoard's scalars are
    MetricsLog's; its sample table is a TensorBoardSamples here). Rank 0 only: [] when not
    enabled. resuming: continue the tracker runs recorded in RUN_DIR/trackers.json."""
    if not enabled:
        return []
    run_dir = Path(run_dir)
    ids_path = run_dir / IDS_FILE
    ids = json.loads(ids_path.read_text()) if resuming and ids_path.is_file() else {}
    options = cfg.run
    name = options.run_name or run_dir.resolve().name
    config = flat_config(cfg)
    opened = []
    for tracker in parse_report_to(options.report_to):
        if tracker == "tensorboard":
            opened.append(TensorBoardSamples(run_dir / "tensorboard" / "samples"))
        else:
            cls = {"wandb": WandbTracker, "mlflow": MLflowTracker, "swanlab": SwanLabTracker}[tracker]
            opened.append(cls(options.tracker_project, name, config, run_dir, ids.get(tracker)))
            ids[tracker] = opened[-1].run_id
    if ids:
        ids_path.write_text(json.dumps(ids, indent=2) + "\n")
    return opened


def stage_metrics(record: dict) -> tuple[str, int, dict[str, float]] | None:
    """(stage, step, {"<stage>/<name>": value}) of a metrics.jsonl record's finite numbers;
    None for a record without an int step."""
    stage, step = record.get("stage", "train"), record.get("step")
    if not isinstance(step, int):
        return None
    values = {f"{stage}/{k}": float(v) for k, v in record.items()
              if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)
              and math.isfinite(v)}
    return stage, step, values


SAMPLE_COLUMNS = ("step", "prompt_index", "completion_index", "prompt", "completion", "reward", "advantage")


def sample_columns(rows: list[dict]) -> list[str]:
    """The table's columns: the fixed ones, then every reward function's and component's."""
    extra = [k for k in rows[0] if k not in SAMPLE_COLUMNS and k not in ("image", "source")]
    return [*SAMPLE_COLUMNS, *extra]


# -------------------------------------------------------------------------------- wandb


class WandbTracker:
    """wandb.init in RUN_DIR/wandb; WANDB_MODE=offline keeps everything local (wandb sync
    uploads it later). A resumed run passes the stored id with resume="allow"."""

    def __init__(self, project: str, name: str, config: dict, run_dir: Path, run_id: str | None):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, name=name, config=config, dir=str(run_dir), id=run_id,
                              resume="allow" if run_id else None)
        self.run_id = self.run.id
        self.stages: set[str] = set()

    def log(self, record: dict) -> None:
        parsed = stage_metrics(record)
        if parsed is None:
            return
        stage, step, values = parsed
        if stage not in self.stages:  # each stage on its own step axis: both start at 1
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self.stages.add(stage)
        self.run.log({**values, f"{stage}/step": step})

    def log_samples(self, rows: list[dict], step: int) -> None:
        columns = sample_columns(rows)
        table = self.wandb.Table(columns=[*columns, "image"])
        for row in rows:
            image = self.wandb.Image(row["image"]) if row.get("image") and Path(row["image"]).is_file() else None
            table.add_data(*[row.get(c) for c in columns], image)
        self.run.log({"grpo/samples": table, "grpo/step": step})

    def close(self) -> None:
        self.run.finish()


# -------------------------------------------------------------------------------- MLflow


class MLflowTracker:
    """An MLflow run through MlflowClient; the store is MLFLOW_TRACKING_URI's (a file: or
    sqlite: URI keeps it local), else MLflow's default. Experiment = --tracker_project."""

    def __init__(self, project: str, name: str, config: dict, run_dir: Path, run_id: str | None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        if run_id is not None:  # continue it; its parameters are in already
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        params = [Param(k, str(v)) for k, v in config.items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 parameters
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric

        parsed = stage_metrics(record)
        if parsed is None:
            return
        _, step, values = parsed
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log_samples(self, rows: list[dict], step: int) -> None:
        self.client.log_dict(self.run_id, rows, f"samples/step_{step:06d}.json")
        for image in sorted({r["image"] for r in rows if r.get("image") and os.path.isfile(r["image"])}):
            self.client.log_artifact(self.run_id, image, f"samples/step_{step:06d}")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


# -------------------------------------------------------------------------------- SwanLab


class SwanLabTracker:
    """swanlab.init (SWANLAB_MODE=local/offline keeps it local). Not covered by the tests:
    swanlab is not in the trackers extra (pip install '.[swanlab]')."""

    def __init__(self, project: str, name: str, config: dict, run_dir: Path, run_id: str | None):
        import swanlab

        self.swanlab = swanlab
        self.run = swanlab.init(project=project, experiment_name=name, config=config,
                                logdir=str(run_dir / "swanlog"), id=run_id,
                                resume="allow" if run_id else None)
        self.run_id = getattr(self.run, "id", None) or getattr(getattr(self.run, "public", None), "run_id", None)

    def log(self, record: dict) -> None:
        parsed = stage_metrics(record)
        if parsed is not None:
            _, step, values = parsed
            self.swanlab.log(values, step=step)

    def log_samples(self, rows: list[dict], step: int) -> None:
        self.swanlab.log({"grpo/samples": self.swanlab.Text(markdown_table(rows))}, step=step)

    def close(self) -> None:
        self.swanlab.finish()


# -------------------------------------------------------------------------------- TensorBoard


class TensorBoardSamples:
    """The sample table as TensorBoard text (markdown) and the prompts' images, in
    RUN_DIR/tensorboard/samples (the scalars are MetricsLog's). Nothing when tensorboard is
    not installed."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
        else:
            self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, record: dict) -> None:
        pass  # MetricsLog writes the scalars

    def log_samples(self, rows: list[dict], step: int) -> None:
        if self.writer is None:
            return
        self.writer.add_text("samples", markdown_table(rows), step)
        import numpy as np
        from PIL import Image

        for image in sorted({r["image"] for r in rows if r.get("image") and os.path.isfile(r["image"])}):
            pixels = np.asarray(Image.open(image).convert("RGB"))
            self.writer.add_image(f"samples/{Path(image).name}", pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table (TensorBoard renders text as markdown)."""
    columns = sample_columns(rows)

    def cell(value) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return " ".join(text.split()).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
