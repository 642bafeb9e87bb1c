"""--report_to: metrics, config and sample tables reach wandb (offline) and MLflow (a local
sqlite store), read back through each library's own API; a missing extra stops the run at
start-up; a resumed run continues its tracker run. No test touches the network."""
import importlib.util
import json
import struct
import time
from pathlib import Path

import pytest

import train
from r1vl.config import make_config
from r1vl.run import trackers
from r1vl.run.metrics import MetricsLog
from r1vl.run.trackers import open_trackers, parse_report_to


def records(stage, steps, start=1):
    for step in range(start, start + steps):
        record = {"stage": stage, "step": step, "loss": 1.0 / step}
        if stage == "grpo":
            record.update(reward=0.1 * step, **{"rewards/accuracy": 0.05 * step}, reward_funcs="accuracy")
            if step % 2 == 0:
                record["eval_reward"] = 0.2 * step
        yield record


ROWS = [{"step": 2, "prompt_index": 0, "completion_index": g, "prompt": "What is 1+1?", "image": "",
         "source": "x:0", "completion": f"answer {g}", "reward": float(g), "advantage": g - 0.5,
         "rewards/accuracy": float(g), "accuracy": float(g), "step_rar": 0.0, "step_rvr": 1.0,
         "key_step_match": 0.0} for g in range(2)]


def short_run(run_dir, report_to, resuming=False, grpo=(4, 1)):
    cfg = make_config(report_to=report_to, run_name="short", tracker_project="r1vl-test", run_dir=str(run_dir))
    log = MetricsLog(run_dir, True, resumed_at=("grpo", grpo[1] - 1) if resuming else None,
                     tensorboard=False, trackers=open_trackers(cfg, run_dir, True, resuming=resuming))
    if not resuming:
        for r in records("sft", 3):
            log.log(r)
    for r in records("grpo", *grpo):
        log.log(r)
    log.log_samples(ROWS, 2)
    ids = {type(t).__name__: t.run_id for t in log.trackers}
    log.close()
    return ids


# -------------------------------------------------------------------------------- MLflow


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    if importlib.util.find_spec("mlflow") is None or importlib.util.find_spec("sqlalchemy") is None:
        pytest.skip("the trackers extra is not installed (pip install '.[trackers]')")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # a sqlite store keeps its artifacts in ./mlruns
    return uri


def test_mlflow_gets_one_point_per_step_per_stage_and_the_config_once(tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    run_id = short_run(tmp_path, "mlflow")["MLflowTracker"]
    client = MlflowClient(mlflow_store)
    history = client.get_metric_history(run_id, "grpo/reward")
    assert [(m.step, round(m.value, 6)) for m in history] == [(s, round(0.1 * s, 6)) for s in range(1, 5)]
    assert [m.step for m in client.get_metric_history(run_id, "sft/loss")] == [1, 2, 3]  # apart from GRPO's
    assert [m.step for m in client.get_metric_history(run_id, "grpo/eval_reward")] == [2, 4]
    assert [m.step for m in client.get_metric_history(run_id, "grpo/rewards/accuracy")] == [1, 2, 3, 4]
    run = client.get_run(run_id)
    assert run.info.run_name == "short" and run.data.params["report_to"] == "mlflow"
    assert run.data.params["num_generations"] == str(make_config().sampling.num_generations)
    assert client.get_experiment(run.info.experiment_id).name == "r1vl-test"
    samples = client.list_artifacts(run_id, "samples")
    assert [a.path for a in samples] == ["samples/step_000002.json"]
    assert run.info.status == "FINISHED"


def test_a_resumed_run_continues_its_mlflow_run(tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    first = short_run(tmp_path, "mlflow", grpo=(2, 1))["MLflowTracker"]
    again = short_run(tmp_path, "mlflow", resuming=True, grpo=(2, 3))["MLflowTracker"]
    assert again == first
    history = MlflowClient(mlflow_store).get_metric_history(first, "grpo/reward")
    assert [m.step for m in history] == [1, 2, 3, 4]
    # A fresh start in the same directory (no --resume) opens a new run.
    assert short_run(tmp_path, "mlflow", grpo=(1, 1))["MLflowTracker"] != first


# -------------------------------------------------------------------------------- wandb


@pytest.fixture
def wandb_offline(monkeypatch):
    if importlib.util.find_spec("wandb") is None:
        pytest.skip("the trackers extra is not installed (pip install '.[trackers]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def wandb_records(run_dir: Path):
    """Every record of an offline run's .wandb file, parsed with wandb's own protobuf
    (wandb 0.31 ships no Python reader of offline runs; the file is a LevelDB-style log:
    a 7-byte "W&B" header, then 32 KiB blocks of chunks, each with a 7-byte header:
    CRC32 (4), length (2, little-endian), type (1: full, 2: first, 3: middle, 4: last))."""
    from wandb.proto import wandb_internal_pb2

    out = []
    for path in sorted(Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            block_left = 32768 - pos % 32768
            if block_left < 7:  # zero padding at a block's end
                pos += block_left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind == 0 and length == 0:
                break
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                out.append((path.parent.name, record))
    return out


def finished_records(run_dir, runs=1, timeout_s=60.0):
    """The records once every offline run's exit record is in: wandb's service process may
    still be writing when finish() returns."""
    deadline = time.monotonic() + timeout_s
    while True:
        recs = wandb_records(run_dir)
        if sum(r.WhichOneof("record_type") == "exit" for _, r in recs) >= runs or time.monotonic() > deadline:
            return [r for _, r in recs]
        time.sleep(0.5)


def test_wandb_offline_gets_one_point_per_step_per_stage_and_the_config_once(tmp_path, wandb_offline):
    run_id = short_run(tmp_path, "wandb")["WandbTracker"]
    recs = finished_records(tmp_path)
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in recs if r.WhichOneof("record_type") == "history"]
    grpo = [(h["grpo/step"], h["grpo/reward"]) for h in history if "grpo/reward" in h]
    assert [s for s, _ in grpo] == [1, 2, 3, 4] and [round(v, 6) for _, v in grpo] == [0.1, 0.2, 0.3, 0.4]
    assert [h["sft/step"] for h in history if "sft/loss" in h] == [1, 2, 3]
    assert [h["grpo/step"] for h in history if "grpo/eval_reward" in h] == [2, 4]
    assert sum("grpo/samples/_type" in h for h in history) == 1  # the table, once
    assert next(h["grpo/samples/_type"] for h in history if "grpo/samples/_type" in h) == "table-file"
    configs = [r.config for r in recs if r.WhichOneof("record_type") == "config"]
    configs += [r.run.config for r in recs if r.WhichOneof("record_type") == "run"]
    keys = {item.key or item.nested_key[0] for c in configs for item in c.update}
    assert "num_generations" in keys and "report_to" in keys
    assert sum((item.key or item.nested_key[0]) == "num_generations" for c in configs for item in c.update) == 1
    runs = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    assert runs[0].run_id == run_id and runs[0].display_name == "short" and runs[0].project == "r1vl-test"


def test_a_resumed_run_reuses_its_wandb_run_id(tmp_path, wandb_offline):
    first = short_run(tmp_path, "wandb", grpo=(2, 1))["WandbTracker"]
    again = short_run(tmp_path, "wandb", resuming=True, grpo=(2, 3))["WandbTracker"]
    assert again == first
    # Offline, wandb writes a second offline-run directory with the same id; `wandb sync`
    # of both appends to the one run.
    recs = finished_records(tmp_path, runs=2)
    assert {r.run.run_id for r in recs if r.WhichOneof("record_type") == "run"} == {first}
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in recs if r.WhichOneof("record_type") == "history"]
    assert sorted(h["grpo/step"] for h in history if "grpo/reward" in h) == [1, 2, 3, 4]


# -------------------------------------------------------------------------------- the option


def test_report_to_values():
    assert parse_report_to("none") == ()
    assert parse_report_to("tensorboard") == ("tensorboard",)
    with pytest.raises(ValueError, match="--report_to: unknown tracker"):
        parse_report_to("tensorboard,neptune")
    with pytest.raises(ValueError, match="none cannot be combined"):
        parse_report_to("none,wandb")


def test_a_missing_extra_stops_the_run_before_the_model_loads(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"--report_to wandb: the wandb package is not installed.*\.\[trackers\]"):
        parse_report_to("tensorboard,wandb")
    with pytest.raises(SystemExit) as exit_:
        train.main(["--report_to", "wandb", "--run_dir", "unused"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --report_to wandb") and "pip install '.[trackers]'" in err
    assert "Traceback" not in err
