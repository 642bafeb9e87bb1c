"""DeepSpeed ZeRO-2 / ZeRO-3 behind the engine interface (r1vl.update.deepspeed_engine), on CPU/gloo.

The --deepspeed JSON checks are plain unit tests, and so is lockstep (the ranks are threads
meeting in a stand-in all-reduce). The rest launches torchrun with two ranks:
tests/r1vl/update/deepspeed_worker.py drives the three engines directly through random GRPO updates
(uneven micro-batches, an idle rank, a KL reference, rollouts inside gathered(), a save/load
round trip), and train.py runs SFT + StepGRPO with each. The first DeepSpeed process on a
machine compiles DeepSpeed's shared-memory comm op (about 45 s, cached in
~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR).

Tolerance: in float32 the ZeRO runs differ from plain data parallelism only in summation
order (DeepSpeed's bucketed reductions and its norm), so per-step losses and gradient norms
must agree to rtol 1e-5 and weights to 5e-5 absolute. Measured on two CPU ranks: losses
within 6e-8 relative, gradient norms within 7e-7, weights (scale 0.02, moved about 4e-3 by
four updates at lr 1e-3) within 6e-7 (ZeRO-2) and 7e-6 (ZeRO-3).
"""
import json
import os
import random
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import torch
from jsonl_records import metrics_records

from r1vl.config import make_config
from r1vl.deepspeed_config import read_deepspeed_config, resolved_config
from r1vl.run.setup import check_inputs
from r1vl.update.deepspeed_engine import plain_optimizer_state
from r1vl.update.microbatches import plan_microbatches, plan_shared_microbatches
from r1vl.update.packing import Sequence

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "configs"
RTOL, WEIGHT_ATOL, LOSS_ATOL, GRPO_RTOL = 1e-5, 5e-5, 1e-5, 1e-4


def _torchrun(args, cwd, timeout=600, kill_at: str | None = None):
    """torchrun with two ranks; kill_at: both ranks SIGKILL themselves there (args start with
    train.py, which tests/r1vl/run/killed_train.py then runs)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    if kill_at:
        args = [str(ROOT / "tests" / "r1vl" / "run" / "killed_train.py"), kill_at, *args]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if kill_at:
        assert result.returncode != 0, "the run was to be killed"
        return result
    assert result.returncode == 0, result.stderr[-4000:]
    # A clean exit, not one that finished the work and then aborted in a destructor.
    assert "terminate called" not in result.stderr and "Abort" not in result.stderr, result.stderr[-3000:]
    return result


def _close(a: float, b: float, atol: float = 1e-7, rtol: float = 1e-5) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b)) + atol


# -------------------------------------------------------------------------------- the JSON


def _start(**options) -> None:
    """The start-up checks of a run with these options (train.py main: the --deepspeed file is
    read and checked against --dtype and --max_grad_norm there)."""
    check_inputs(make_config(**options))


def _config_file(tmp_path, content) -> str:
    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero2_offload.json", "zero3_offload.json"])
def test_shipped_configs_are_accepted(name):
    _start(deepspeed=str(CONFIGS / name))
    raw = read_deepspeed_config(str(CONFIGS / name), "auto", 1.0)
    assert raw["zero_optimization"]["stage"] == int(name[4])


ZERO2 = {"zero_optimization": {"stage": 2}}


@pytest.mark.parametrize("content, options, message", [
    ("{not json", {}, "not valid JSON"),
    ("[1, 2]", {}, "expected a JSON object"),
    ({**ZERO2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}, {}, "--lr"),
    ({**ZERO2, "scheduler": {"type": "WarmupLR"}}, {}, "--lr_schedule"),
    ({**ZERO2, "train_batch_size": 32}, {}, "train_batch_size must be \"auto\""),
    ({**ZERO2, "gradient_accumulation_steps": 4}, {}, "gradient_accumulation_steps must be \"auto\""),
    ({**ZERO2, "gradient_clipping": 0.5}, {"max_grad_norm": 1.0}, "gradient_clipping"),
    ({**ZERO2, "fp16": {"enabled": True}}, {}, "fp16 is not supported"),
    ({**ZERO2, "bf16": {"enabled": True}}, {"dtype": "float32"}, "--dtype is float32"),
    ({**ZERO2, "bf16": {"enabled": "auto"}}, {"dtype": "float16"}, "--dtype float16"),
    ({**ZERO2, "bf16": {"check_grad_overflow": False}}, {}, "check_grad_overflow"),
    ({**ZERO2, "train_batch_sise": "auto"}, {}, "unknown or unsupported key 'train_batch_sise'"),
    ({"zero_optimization": {"stage": 1}}, {}, "stage must be one of"),
    ({}, {}, "stage must be one of"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, {}, "offload_param needs stage 3"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}, {}, "NVMe"),
    ({**ZERO2, "managed_gradient_accumulation": True}, {}, "managed_gradient_accumulation"),
    ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}, {}, "compute_grad_norm"),
    ({"zero_optimization": {"stage": 2, "elastic_checkpoint": True}}, {}, "elastic_checkpoint"),
])
def test_bad_or_conflicting_configs_are_refused(tmp_path, content, options, message):
    with pytest.raises(ValueError, match=message) as info:
        _start(deepspeed=_config_file(tmp_path, content), **options)
    assert "--deepspeed" in str(info.value) or "--dtype" in str(info.value)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--deepspeed .*no such file"):
        _start(deepspeed=str(tmp_path / "nope.json"))


def test_values_that_agree_are_accepted(tmp_path):
    content = {**ZERO2, "gradient_clipping": 0.5, "bf16": {"enabled": False}, "fp16": {"enabled": "auto"}}
    _start(deepspeed=_config_file(tmp_path, content), max_grad_norm=0.5, dtype="float32")


def test_resolved_config_fills_what_r1vl_owns():
    cfg = make_config(deepspeed=str(CONFIGS / "zero3.json"), max_grad_norm=0.7)
    path, max_grad_norm = cfg.optimizer.deepspeed, cfg.optimizer.max_grad_norm
    raw = read_deepspeed_config(path, cfg.policy.dtype, max_grad_norm)
    out = resolved_config(raw, path, torch.bfloat16, max_grad_norm, world_size=16)
    assert (out["train_batch_size"], out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]) \
        == (16, 1, 1)
    assert out["gradient_clipping"] == 0.7 and out["managed_gradient_accumulation"] is False
    assert out["bf16"]["enabled"] is True and out["fp16"] == {"enabled": False}
    assert resolved_config(raw, path, torch.float32, 0.7, world_size=2)["bf16"]["enabled"] is False
    assert raw["bf16"]["enabled"] == "auto"  # the file's values are not modified


def test_resolved_config_refuses_a_dtype_against_the_file(tmp_path):
    path = _config_file(tmp_path, {**ZERO2, "bf16": {"enabled": True}})
    _start(deepspeed=path)  # --dtype auto: not known at start-up
    with pytest.raises(ValueError, match="bf16.enabled is true but the model's dtype is torch.float32"):
        resolved_config(read_deepspeed_config(path, "auto", 1.0), path, torch.float32, 1.0, world_size=2)


def test_saved_optimizer_state_is_plain_data():
    state = {"loss_scaler": object(), "param_slice_mappings": [object()], "zero_stage": 2,
             "base_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1.0}]}}
    plain = plain_optimizer_state(state)
    assert set(plain) == {"zero_stage", "base_optimizer_state"}
    with pytest.raises(TypeError, match=r"optimizer state\['extra'\] is a object"):
        plain_optimizer_state({"extra": object()})


# -------------------------------------------------------------------------------- lockstep


class _Ranks:
    """World_size threads standing for the ranks of one step, with all_reduce_max a real
    rendezvous: every rank posts its values and reads the element-wise max of all of them."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=10)
        self.posted: dict[int, list[float]] = {}
        self.local = threading.local()

    def all_reduce_max(self, values, device):
        self.posted[self.local.rank] = [float(v) for v in values]
        self.barrier.wait()
        out = [max(column) for column in zip(*self.posted.values())]
        self.barrier.wait()  # nobody posts the next values before every rank has read these
        return out

    def run(self, fn, per_rank: list) -> list:
        """fn(rank, per_rank[rank]) on every rank at once; the results in rank order."""
        results: list = [None] * self.world_size
        errors: list = []

        def body(rank):
            self.local.rank = rank
            try:
                results[rank] = fn(rank, per_rank[rank])
            except BaseException as error:  # noqa: BLE001  (re-raised in the test's thread)
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def _rank_microbatches(rng: random.Random, rank: int, budget: int) -> tuple[list, int]:
    """One rank's [(indices, stand-in for its PackedBatch)] as r1vl.update.microbatches plans
    them (shared-prompt or not), for a random number of GRPO groups (0 = all prompts skipped);
    and the rank's sequence count."""
    groups, g = rng.randint(0, 6), rng.randint(2, 4)
    prompts = [[rank * 100 + p] * rng.randint(1, budget // 3) for p in range(groups)]
    sequences = [Sequence(prompt, [7] * rng.randint(1, budget // 3 - 1)) for prompt in prompts for _ in range(g)]
    if rng.random() < 0.5:
        plan = plan_shared_microbatches(sequences, budget).microbatches
    else:
        lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in sequences]
        plan = plan_microbatches(lengths, budget, groups=[i // g for i in range(len(sequences))])
    return [(idx, f"packed {rank}.{k}") for k, idx in enumerate(plan)], len(sequences)


def test_lockstep_gives_every_rank_as_many_microbatches_and_loses_none(monkeypatch):
    """What keeps ranks in step under ZeRO: every rank runs the same number of micro-batches
    (the largest count over the ranks, no more), its own micro-batches all, once each and in
    order, then (None, idle batch) entries that the update weights 0; so over the ranks every
    sequence is trained on exactly once. A rank with no micro-batch at all (every prompt
    skipped) runs idle batches only. PlainEngine (gradients summed once, after the step) keeps
    each rank's list as it is."""
    from r1vl import distributed
    from r1vl.update.deepspeed_engine import DeepSpeedEngine
    from r1vl.update.engine import PlainEngine

    rng = random.Random(5)
    idle = "idle batch"
    for case in range(150):
        world_size, budget = rng.randint(1, 5), rng.randint(12, 60)
        mine = [_rank_microbatches(rng, r, budget) for r in range(world_size)]
        micro = [m for m, _ in mine]
        ranks = _Ranks(world_size)
        monkeypatch.setattr(distributed, "all_reduce_max", ranks.all_reduce_max)

        def lockstep(rank, microbatches):
            engine = types.SimpleNamespace(world=distributed.Dist(rank, world_size, rank, torch.device("cpu")),
                                           _idle_batch=idle)
            return DeepSpeedEngine.lockstep(engine, list(microbatches))

        work = ranks.run(lockstep, micro)
        steps = max(len(m) for m in micro)
        assert [len(w) for w in work] == [steps] * world_size, (case, "ranks differ in micro-batch count")
        for rank, (w, m) in enumerate(zip(work, micro)):
            assert w[:len(m)] == m, (case, rank, "a micro-batch lost, repeated or moved")
            assert w[len(m):] == [(None, idle)] * (steps - len(m)), (case, rank)
        trained = sorted((rank, i) for rank, w in enumerate(work) for idx, _ in w if idx is not None for i in idx)
        assert trained == [(rank, i) for rank, (_, n) in enumerate(mine) for i in range(n)], case
        assert PlainEngine.lockstep(None, micro[0]) == micro[0]


# -------------------------------------------------------------------------------- the engines


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen3_vl"])
def engine_runs(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    _torchrun([str(ROOT / "tests" / "r1vl" / "update" / "deepspeed_worker.py"), str(out), request.param], cwd=out)
    return out, json.loads((out / "results.json").read_text())


def test_zero2_and_zero3_updates_match_plain_data_parallelism(engine_runs):
    """Losses, gradient norms, rates and final weights of ZeRO-2/3 against PlainEngine, with
    uneven micro-batch counts, an idle rank (step 1) and rollouts inside gathered()."""
    out, results = engine_runs
    plain = results["plain"]["records"]
    final_plain = torch.load(out / "plain_final.pt", weights_only=True)
    for kind in ("zero2", "zero3"):
        records = results[kind]["records"]
        assert len(records) == len(plain) == 4
        for mine, ref in zip(records, plain):
            for key in ("loss", "grad_norm", "lr"):
                assert _close(mine[key], ref[key]), (kind, mine["step"], key, mine[key], ref[key])
            assert mine["digests"][0] == mine["digests"][1], (kind, mine["step"], "ranks differ")
        final = torch.load(out / f"{kind}_final.pt", weights_only=True)
        assert final.keys() == final_plain.keys()
        for name, tensor in final.items():
            torch.testing.assert_close(tensor, final_plain[name], rtol=0, atol=WEIGHT_ATOL, msg=f"{kind} {name}")
        assert any(r["grad_norm"] > 0.1 for r in records)  # the updates were not trivially zero


def test_saved_engine_state_resumes_exactly(engine_runs):
    """Weights + engine.save_state after step 2, then a fresh model and engine with
    load_state: steps 3-4 repeat bit for bit (same digests), for every engine."""
    out, results = engine_runs
    for kind, result in results.items():
        tail = result["records"][-2:]
        for mine, ref in zip(result["resumed"], tail):
            assert mine["digests"] == ref["digests"], (kind, mine["step"])
            assert mine["loss"] == ref["loss"] and mine["lr"] == ref["lr"], (kind, mine["step"])
    assert sorted(p.name for p in (out / "zero3").iterdir()) == ["engine.json", "zero_rank00000.pt",
                                                                  "zero_rank00001.pt"]


# -------------------------------------------------------------------------------- train.py


WARM_RECORDS, WARM_STEPS = 6, 80


@pytest.fixture(scope="session")
def warm_checkpoint(tmp_path_factory):
    """(data file, checkpoint dir): the built-in tiny model after WARM_STEPS SFT steps at a high
    rate on WARM_RECORDS synthetic records, which it then nearly recites (SFT loss about 0.01
    per token). Sampled at temperature 1 its completions still differ, so that GRPO groups
    have rewards that differ and the updates are not zero; the random tiny model earns 0 on
    every completion. One process, about 10 s on two cores. The last 2 records are the held-out prompts, as in
    the runs that start from it."""
    from r1vl.data.synthetic import write_dataset

    out = tmp_path_factory.mktemp("warm")
    write_dataset(out / "data", n=WARM_RECORDS, seed=0)
    data = out / "data" / "data.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(ROOT / "train.py"), "--progress", "false", "--run_dir", str(out / "run"),
           "--data", str(data), "--stage", "sft", "--sft_steps", str(WARM_STEPS), "--sft_lr", "3e-3",
           "--sft_batch_size", "4", "--eval_prompts", "2", "--save_every", "0"]
    result = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert metrics_records(out / "run", "sft")[-1]["loss"] < 0.05, "the warm-up did not learn the records"
    return data, out / "run" / "final"


def test_train_py_with_zero2_and_zero3_matches_plain(tmp_path, warm_checkpoint):
    """`torchrun train.py` (SFT + StepGRPO with a KL reference, from the warmed-up tiny model)
    plain, with --deepspeed configs/zero2.json and configs/zero3.json: same per-step numbers,
    identical ranks, and a saved final policy that loads and equals plain's within tolerance.
    ZeRO-3 with --activation_checkpointing on gives exactly ZeRO-3's numbers and weights. Then
    a ZeRO-3 run with checkpointing, killed after its checkpoint of GRPO step 1 and resumed
    (the policy and the ZeRO-3 optimizer shards from the checkpoint, the KL reference loaded
    from RUN_DIR/reference and sharded again) ends with exactly the uninterrupted run's weights.

    The GRPO updates are not zero: every step has groups whose rewards differ, and GRPO moves
    the weights far beyond the tolerance of the comparison, so a wrong advantage, weighting,
    reference or rollout under ZeRO shows. A micro-batch budget of 256 tokens splits every
    prompt group over several micro-batches, unevenly over the ranks (measured: 8 and 7 in
    the first GRPO step, so that ZeRO pads rank 1 with a filler, engine.lockstep)."""
    from safetensors.torch import load_file

    from r1vl.model.policy import check_checkpoint_dir

    data, warm = warm_checkpoint
    args = ["--progress", "false", "--model", str(warm), "--data", str(data), "--stage", "sft+grpo",
            "--sft_steps", "2", "--sft_batch_size", "2", "--sft_lr", "1e-4", "--num_steps", "2", "--batch_size", "8",
            "--eval_prompts", "2", "--lr", "2e-4", "--temperature", "1.0", "--max_pixels", "3136",
            "--max_prompt_length", "128", "--max_completion_length", "128", "--micro_batch_tokens", "256",
            "--reward_symbolic", "false", "--beta", "0.04", "--num_iterations", "2"]
    zero3 = ["--deepspeed", str(CONFIGS / "zero3.json"), "--save_every", "1", "--keep_last", "1"]
    checkpointed = [*zero3, "--activation_checkpointing", "on"]
    extras = {"plain": [], "zero2": ["--deepspeed", str(CONFIGS / "zero2.json")], "zero3": zero3,
              "zero3-checkpointed": checkpointed}
    runs = {}
    for kind, extra in extras.items():
        run_dir = tmp_path / kind
        result = _torchrun([str(ROOT / "train.py"), "--run_dir", str(run_dir), *args, *extra], cwd=tmp_path)
        assert f"activation checkpointing {'on' if kind == 'zero3-checkpointed' else 'off'}" in result.stdout, kind
        if kind == "plain":
            assert "real_accelerator" not in result.stderr  # deepspeed was never imported
        results = json.loads((run_dir / "results.json").read_text())
        assert len(results["weight_digests"]) == 2 and len(set(results["weight_digests"])) == 1, kind
        assert check_checkpoint_dir(run_dir / "final") == "qwen2_vl"
        runs[kind] = run_dir

    grpo = metrics_records(runs["plain"], "grpo")
    assert all(r["reward_std_in_group"] > 0.1 and r["grad_norm"] > 0.1 for r in grpo), grpo
    assert any(r["split_prompt_groups"] > 0 for r in grpo)
    # GRPO moved the weights, from the policy as GRPO started (the KL reference) to the end,
    # by more than 4x the tolerance below: measured 678k of the 1.1M weights (by up to 8e-4),
    # while ZeRO-3's weights differ from plain's by more than 1e-5 in 2 of them.
    start = load_file(runs["plain"] / "reference" / "model.safetensors")
    end = load_file(runs["plain"] / "final" / "model.safetensors")
    moved = sum(int(((end[name] - start[name]).abs() > 4 * WEIGHT_ATOL).sum()) for name in end)
    assert moved > 100_000, moved
    final_plain = load_file(runs["plain"] / "final" / "model.safetensors")
    for kind in ("zero2", "zero3"):
        for stage, keys in (("sft", ("loss", "grad_norm", "lr")),
                            ("grpo", ("loss", "grad_norm", "kl", "reward", "reward_std_in_group", "sequences",
                                      "completion_len"))):
            mine, ref = metrics_records(runs[kind], stage), metrics_records(runs["plain"], stage)
            assert len(mine) == len(ref) == 2, (kind, stage)
            for a, b in zip(mine, ref):
                for key in keys:
                    # GRPO's loss sums terms that cancel (advantages have zero mean in each group),
                    # so reduction-order error is absolute, about 1e-6, whatever the loss's size;
                    # and from the warm model's sharp logits the gradient norms differ by up to
                    # 2e-5 relative between engines (a filler weighted 1 instead of 0: 9e-4).
                    grpo = stage == "grpo"
                    assert _close(a[key], b[key], LOSS_ATOL if grpo and key == "loss" else 1e-7,
                                  GRPO_RTOL if grpo else RTOL), (kind, stage, a["step"], key, a[key], b[key])
        final = load_file(runs[kind] / "final" / "model.safetensors")
        assert final.keys() == final_plain.keys()
        for name, tensor in final.items():  # full weights, not ZeRO-3's empty placeholders
            torch.testing.assert_close(tensor, final_plain[name], rtol=0, atol=WEIGHT_ATOL, msg=f"{kind} {name}")

    # Activation checkpointing under ZeRO-3 changes no number: the recomputed layers gather
    # their weights again and give back the same activations, so every step's loss and the
    # final weights equal the run without it.
    for stage in ("sft", "grpo"):
        for a, b in zip(metrics_records(runs["zero3-checkpointed"], stage), metrics_records(runs["zero3"], stage)):
            assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (stage, a["step"])
    expected = load_file(runs["zero3"] / "final" / "model.safetensors")
    got = load_file(runs["zero3-checkpointed"] / "final" / "model.safetensors")
    for name in expected:
        assert torch.equal(got[name], expected[name]), name

    # ZeRO-3 with activation checkpointing, killed after the checkpoint of global step 3 (SFT 2
    # + GRPO 1), then resumed: exactly the uninterrupted run's weights.
    run_dir = tmp_path / "zero3-resumed"
    train = [str(ROOT / "train.py"), "--run_dir", str(run_dir), *args, *checkpointed]
    _torchrun(train, cwd=tmp_path, kill_at="after_checkpoint:3")
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step_00000003").glob("zero_rank*.pt")) == [
        "zero_rank00000.pt", "zero_rank00001.pt"]
    result = _torchrun([*train, "--resume", "auto"], cwd=tmp_path)
    assert "step_00000003 (grpo step 1)" in result.stdout
    expected = load_file(runs["zero3-checkpointed"] / "final" / "model.safetensors")
    got = load_file(run_dir / "final" / "model.safetensors")
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_frozen_vision_tower_under_zero2(tmp_path):
    """--freeze_vision_tower true with ZeRO-2, SFT then StepGRPO (one engine per stage), as
    one process: the final vision tower is bit-identical to RUN_DIR/tiny-init, every
    language-model weight moved (weight decay moves whatever the optimizer holds, even at
    GRPO's zero advantages), and the checkpointed fp32 master partition is exactly the
    language model's size: DeepSpeed flattened no frozen parameter into it."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(ROOT / "train.py"), "--progress", "false", "--run_dir", str(run_dir),
           "--stage", "sft+grpo", "--freeze_vision_tower", "true", "--sft_steps", "2", "--num_steps", "1",
           "--batch_size", "8", "--eval_prompts", "0", "--max_completion_length", "16", "--weight_decay", "0.1",
           "--save_every", "1", "--deepspeed", str(CONFIGS / "zero2.json")]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    initial = load_file(run_dir / "tiny-init" / "model.safetensors")
    warmed_up = load_file(run_dir / "checkpoints" / "step_00000002" / "policy" / "model.safetensors")
    final = load_file(run_dir / "final" / "model.safetensors")
    vision = {n for n in initial if "visual" in n.split(".")}
    language = set(initial) - vision
    assert vision and language and final.keys() == initial.keys()
    for name in vision:
        assert torch.equal(final[name], initial[name]), name
    for before, after in ((initial, warmed_up), (warmed_up, final)):
        assert all(not torch.equal(before[n], after[n]) for n in language)
    state = torch.load(run_dir / "checkpoints" / "step_00000003" / "zero_rank00000.pt", weights_only=True)
    assert state["zero_stage"] == 2
    master = sum(t.numel() for t in state["single_partition_of_fp32_groups"])
    assert master == sum(initial[n].numel() for n in language)


def test_non_finite_updates_are_skipped_on_every_rank_then_stop_the_run(tmp_path):
    """As with the plain engine (test_train): a learning rate of 1e30 makes the next forward
    overflow; ZeRO-3 skips those updates, counts them and stops at --max_bad_steps. Run as
    one process (`python train.py`), which starts a process group of one for DeepSpeed."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), "--progress", "false", "--run_dir", str(run_dir), "--stage", "sft",
           "--sft_steps", "6", "--sft_batch_size", "4", "--sft_lr", "1e30", "--max_bad_steps", "2",
           "--max_grad_norm", "0", "--deepspeed", str(CONFIGS / "zero3.json")]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert result.stdout.count("skipped an update") == 2, result.stdout[-2000:]
    assert "updates skipped for non-finite values" in result.stderr
    assert len(metrics_records(run_dir, "sft")) < 6


def test_plain_runs_never_import_deepspeed():
    code = ("import sys, torch, train\n"
            "from r1vl import distributed\n"
            "from r1vl.update.choose_engine import make_engine\n"
            "from r1vl.config import make_config\n"
            "from r1vl.tiny import build_model, build_tokenizer\n"
            "model = build_model(build_tokenizer(['a b'] * 2, vocab_size=300))\n"
            "world = distributed.init('cpu')\n"
            "engine = make_engine(model, make_config().optimizer, 1e-3, 1, world)\n"
            "engine.backward(model.lm_head.weight.sum()); engine.step(True)\n"
            "with engine.gathered(), distributed.gathered(model):\n"
            "    distributed.weight_digests(model)\n"
            "assert 'deepspeed' not in sys.modules\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_plain_engine_refuses_a_deepspeed_checkpoint(tmp_path):
    from r1vl import distributed
    from r1vl.update.choose_engine import make_engine

    (tmp_path / "engine.json").write_text(json.dumps({"zero_stage": 3, "world_size": 2}))
    (tmp_path / "zero_rank00000.pt").write_bytes(b"")
    world = distributed.Dist(0, 1, 0, torch.device("cpu"))
    engine = make_engine(torch.nn.Linear(2, 2), make_config().optimizer, 1e-3, 1, world)
    with pytest.raises(ValueError, match="no optimizer.pt"):
        engine.load_state(tmp_path)


def test_zero3_lora_run_matches_plain(tmp_path):
    """LoRA under ZeRO-3 on two ranks (the warm-up, 3 steps) ends with the plain engine's weights
    (float32: summation order only), its checkpoint holds the adapters and a ZeRO shard of their
    optimizer state only (the frozen base is not in it)."""
    from safetensors.torch import load_file

    common = [str(ROOT / "train.py"), "--progress", "false", "--stage", "sft", "--sft_steps", "3",
              "--sft_batch_size", "4", "--lora_rank", "8", "--sft_lr", "1e-2", "--save_every", "3"]
    runs = {}
    for name, extra in (("plain", []), ("zero3", ["--deepspeed", str(CONFIGS / "zero3.json")])):
        runs[name] = tmp_path / name
        _torchrun([*common, "--run_dir", str(runs[name]), *extra], cwd=tmp_path)
    expected = load_file(runs["plain"] / "final" / "model.safetensors")
    got = load_file(runs["zero3"] / "final" / "model.safetensors")
    initial = load_file(runs["plain"] / "tiny-init" / "model.safetensors")
    assert got.keys() == expected.keys() == initial.keys()
    moved = [n for n in expected if not torch.equal(expected[n], initial[n])]
    assert moved and all(n.endswith("proj.weight") and ".layers." in n and "visual" not in n for n in moved)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=WEIGHT_ATOL, msg=name)
    checkpoint = runs["zero3"] / "checkpoints" / "step_00000003"
    adapters = load_file(checkpoint / "adapter" / "adapter_model.safetensors")
    assert not (checkpoint / "policy").exists()
    state = torch.load(checkpoint / "zero_rank00000.pt", weights_only=True)

    def numel(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel()
        if isinstance(value, dict):
            return sum(numel(v) for v in value.values())
        return sum(numel(v) for v in value) if isinstance(value, (list, tuple)) else 0

    # A rank's shard: half of the adapters' fp32 masters and AdamW moments (1.5 x the adapters,
    # plus padding), nothing of the base, which is 14 times larger.
    n = sum(t.numel() for t in adapters.values())
    assert 1.4 * n <= numel(state) <= 1.6 * n + 1024, (numel(state), n)
    assert sum(t.numel() for t in initial.values()) > 10 * n
