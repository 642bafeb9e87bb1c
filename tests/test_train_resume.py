"""train.py checkpoints and --resume, end to end on CPU: a run SIGKILLed after a checkpoint,
or halfway through writing one, and resumed ends with the same weights as a run never
interrupted.

The kills are real SIGKILLs at exact points (tests/r1vl/run/killed_train.py runs train.py
with the kill patched in), so the tests do not race the trainer.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
KILLED_TRAIN = ROOT / "tests" / "r1vl" / "run" / "killed_train.py"

# WARMUP steps at 3e-3 on 32 synthetic records make the tiny policy nearly recite them, so
# that sampled at temperature 1 its groups earn rewards that differ within 4 StepGRPO steps and
# the GRPO updates (and Adam's moments, the sampler's state, the KL reference) matter. Measured
# with transformers 5.25 / tokenizers 0.23: after 40 steps (SFT loss 0.39) every completion
# still earned 0 and GRPO moved nothing; after 80 (loss 0.08) the first GRPO steps earn 0.9-1.3.
# (On the built-in 4096 records, such short warm-ups earn no reward at all.)
WARMUP = 80
ARGS = ["--sft_steps", str(WARMUP), "--sft_lr", "3e-3", "--num_steps", "4", "--batch_size", "16", "--eval_prompts", "0",
        "--temperature", "1.0", "--max_completion_length", "128", "--save_every", "2", "--keep_last", "2",
        "--beta", "0.04", "--progress", "false"]
DATA: Path | None = None  # the records every run of this module trains on (small_data)


@pytest.fixture(scope="module", autouse=True)
def small_data(tmp_path_factory):
    global DATA
    from r1vl.data.synthetic import write_dataset

    DATA = write_dataset(tmp_path_factory.mktemp("data"), n=32, seed=0)


def _train(run_dir: Path, *extra, kill_at: str | None = None, ranks: int = 1):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    train = [str(KILLED_TRAIN), kill_at, str(ROOT / "train.py")] if kill_at else [str(ROOT / "train.py")]
    cmd = [*launcher, *train, "--run_dir", str(run_dir), "--data", str(DATA), *ARGS, *extra]
    return subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=600)


def _steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for file in sorted(directory.rglob("*")):
        if file.is_file():
            h.update(file.name.encode() + file.read_bytes())
    return h.hexdigest()


def _assert_resumed_to_the_same_weights(run_dir: Path, uninterrupted: Path) -> dict:
    """The resumed run's final weights equal the uninterrupted run's (atol 1e-6), and StepGRPO
    did move them (the comparison is not vacuous). Returns the resumed run's final weights."""
    expected = load_file(uninterrupted / "final" / "model.safetensors")
    got = load_file(run_dir / "final" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    grpo = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()][WARMUP:]
    assert any(r["reward_std_in_group"] > 0 for r in grpo), "the warm-up left GRPO nothing to learn: raise WARMUP"
    before_grpo = load_file(run_dir / "reference" / "model.safetensors")
    assert any(not torch.equal(before_grpo[n], got[n]) for n in got)
    return got


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    result = _train(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_killed_runs_resume_to_the_same_weights(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    # 1. killed right after the warm-up's checkpoint of step 20
    result = _train(run_dir, kill_at="after_checkpoint:20")
    assert result.returncode == -9, result.stderr[-3000:]
    assert _steps(run_dir) == [18, 20]
    # 2. resumed; killed right after GRPO step 2 (global step WARMUP + 2)
    result = _train(run_dir, "--resume", "auto", kill_at=f"after_checkpoint:{WARMUP + 2}")
    assert result.returncode == -9, result.stderr[-3000:]
    assert "resuming from" in result.stdout and "step_00000020 (sft step 20)" in result.stdout
    assert _steps(run_dir) == [WARMUP, WARMUP + 2]
    intact = _digest(run_dir / "checkpoints" / f"step_{WARMUP + 2:08d}")
    # 3. resumed; killed halfway through writing the checkpoint of GRPO step 4 (the policy written,
    #    the optimizer not yet)
    result = _train(run_dir, "--resume", "auto", kill_at=f"checkpoint_write:{WARMUP + 4}")
    assert result.returncode == -9, result.stderr[-3000:]
    assert f"step_{WARMUP + 2:08d} (grpo step 2)" in result.stdout
    assert _steps(run_dir) == [WARMUP, WARMUP + 2]
    assert (run_dir / "checkpoints" / f".tmp-step_{WARMUP + 4:08d}" / "policy").is_dir()
    assert _digest(run_dir / "checkpoints" / f"step_{WARMUP + 2:08d}") == intact
    # 4. resumed from the intact GRPO step 2; runs to the end
    result = _train(run_dir, "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"step_{WARMUP + 2:08d} (grpo step 2)" in result.stdout
    assert _steps(run_dir) == [WARMUP + 2, WARMUP + 4]
    assert not (run_dir / "checkpoints" / f".tmp-step_{WARMUP + 4:08d}").exists()

    _assert_resumed_to_the_same_weights(run_dir, uninterrupted)
    # Each step appears once in the metrics, as in the uninterrupted run.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in records] == [("sft", s) for s in range(1, WARMUP + 1)] + [
        ("grpo", s) for s in range(1, 5)]
    plain = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in plain], rel=1e-5, abs=1e-7)


def test_two_ranks_resume_to_the_same_weights(tmp_path):
    """Each rank restores its own sampler state and data slice: killed after GRPO step 2
    (both ranks), resumed under torchrun, the weights equal those of an uninterrupted run."""
    per_rank = ["--sft_batch_size", "8", "--batch_size", "8"]
    plain, run_dir = tmp_path / "plain", tmp_path / "run"
    result = _train(plain, *per_rank, ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    result = _train(run_dir, *per_rank, ranks=2, kill_at=f"after_checkpoint:{WARMUP + 2}")
    assert result.returncode != 0 and _steps(run_dir) == [WARMUP, WARMUP + 2]
    assert {p.name for p in (run_dir / "checkpoints" / f"step_{WARMUP + 2:08d}").glob("rng_rank*.pt")} == {
        "rng_rank0.pt", "rng_rank1.pt"}
    result = _train(run_dir, *per_rank, "--resume", "auto", ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate called" not in result.stderr and "Abort" not in result.stderr
    expected, got = load_file(plain / "final" / "model.safetensors"), load_file(run_dir / "final" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["weight_digests"][0] == results["weight_digests"][1]
    # A different number of ranks cannot continue this run.
    result = _train(run_dir, *per_rank, "--resume", "auto")
    assert result.returncode != 0 and "was written by 2 rank(s), this run has 1" in result.stderr


def test_resume_refuses_what_does_not_fit(tmp_path):
    # Not a checkpoint directory: a clear error before anything starts.
    result = _train(tmp_path / "other", "--resume", str(tmp_path))
    assert result.returncode == 2 and "not a complete trainer checkpoint" in result.stderr
    # auto without a run directory to look in
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", "auto"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and "--resume auto looks for checkpoints in --run_dir" in result.stderr


def test_checkpoint_contents_load_safely(uninterrupted):
    """Every file a checkpoint holds is JSON, safetensors, or torch.load(weights_only=True)."""
    newest = uninterrupted / "checkpoints" / f"step_{WARMUP + 4:08d}"
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["stage"] == "grpo" and state["step"] == 4 and state["world_size"] == 1
    assert Path(state["reference"]).name == "reference"
    for file in newest.rglob("*.pt"):
        torch.load(file, weights_only=True)
    assert (newest / "policy" / "model.safetensors").is_file()


def test_qwen3_vl_run_killed_and_resumed_ends_with_the_same_weights(tmp_path):
    """The built-in tiny Qwen3-VL (--family qwen3_vl: q/k norms, DeepStack, interleaved M-RoPE):
    killed after GRPO step 2's checkpoint and resumed, it ends where the uninterrupted run ends."""
    family = ["--family", "qwen3_vl"]
    plain, run_dir = tmp_path / "plain", tmp_path / "run"
    result = _train(plain, *family)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((plain / "config.json").read_text())["family"] == "qwen3_vl"
    assert json.loads((plain / "tiny-init" / "config.json").read_text())["model_type"] == "qwen3_vl"
    result = _train(run_dir, *family, kill_at=f"after_checkpoint:{WARMUP + 2}")
    assert result.returncode == -9, result.stderr[-3000:]
    result = _train(run_dir, *family, "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"step_{WARMUP + 2:08d} (grpo step 2)" in result.stdout
    got = _assert_resumed_to_the_same_weights(run_dir, plain)
    assert any("deepstack_merger_list" in n for n in got)
    # --freeze_vision_tower (the built-in run's): the tower, its merger and DeepStack mergers
    # end as the tiny checkpoint was written.
    initial = load_file(run_dir / "tiny-init" / "model.safetensors")
    tower = [n for n in initial if n.startswith("model.visual.")]
    assert any(".deepstack_merger_list." in n for n in tower) and any(".merger." in n for n in tower)
    assert all(torch.equal(initial[n], got[n]) for n in tower)



# Short and small (LoRA runs its own four trainings): a 12-step warm-up of 4 examples, 4 StepGRPO
# steps of 8 completions of at most 32 tokens, a checkpoint every 2 steps.
LORA_WARMUP = 12
LORA = ["--lora_rank", "16", "--sft_steps", str(LORA_WARMUP), "--sft_batch_size", "4", "--sft_lr", "1e-2",
        "--lr", "2e-3", "--batch_size", "8", "--max_completion_length", "32"]


def test_killed_lora_run_resumes_to_the_same_weights(tmp_path):
    """With LoRA a checkpoint holds the adapters and their optimizer state only; killed in the
    warm-up and in StepGRPO and resumed, the run ends with the uninterrupted run's weights. Its
    final/adapter is a PEFT adapter that peft's own PeftModel.from_pretrained loads on the
    model StepGRPO started from (RUN_DIR/reference: the warm-up merged into --model's weights)
    and whose merge_and_unload equals final/."""
    from peft import PeftModel
    from transformers import Qwen2VLForConditionalGeneration

    plain, run_dir = tmp_path / "plain", tmp_path / "run"
    result = _train(plain, *LORA)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = plain / "checkpoints" / f"step_{LORA_WARMUP + 4:08d}"
    assert (checkpoint / "adapter" / "adapter_model.safetensors").is_file() and not (checkpoint / "policy").exists()
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    adapters = load_file(checkpoint / "adapter" / "adapter_model.safetensors")
    assert len(saved["state"]) == len(adapters) and all("lora_" in k for k in adapters)

    result = _train(run_dir, *LORA, kill_at="after_checkpoint:6")
    assert result.returncode == -9, result.stderr[-3000:]
    result = _train(run_dir, *LORA, "--resume", "auto", kill_at=f"after_checkpoint:{LORA_WARMUP + 2}")
    assert result.returncode == -9, result.stderr[-3000:]
    assert "step_00000006 (sft step 6)" in result.stdout
    result = _train(run_dir, *LORA, "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"step_{LORA_WARMUP + 2:08d} (grpo step 2)" in result.stdout

    expected = load_file(plain / "final" / "model.safetensors")
    got = load_file(run_dir / "final" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    plain_records = [json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in plain_records], rel=1e-5, abs=1e-7)

    start = Qwen2VLForConditionalGeneration.from_pretrained(run_dir / "reference", dtype=torch.float32)
    before = {k: v.clone() for k, v in start.state_dict().items()}
    merged = PeftModel.from_pretrained(start, run_dir / "final" / "adapter").merge_and_unload().state_dict()
    final = Qwen2VLForConditionalGeneration.from_pretrained(run_dir / "final", dtype=torch.float32).state_dict()
    assert merged.keys() == final.keys()
    for name in final:
        assert torch.equal(merged[name], final[name]), name
    # The warm-up's adapters were merged into the reference; StepGRPO's moved the weights further
    # only if the short run's groups earned different rewards (then the adapter is not zero).
    grpo = [r for r in plain_records if r["stage"] == "grpo"]
    if any(r["reward_std_in_group"] > 0 for r in grpo):
        assert any(not torch.equal(before[n], final[n]) for n in final)
