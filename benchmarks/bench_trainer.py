"""End-to-end GRPO step: r1vl's trainer (train.py) against TRL's GRPOTrainer, same settings.

    python benchmarks/bench_trainer.py                 # --shape tiny: the built-in tiny Qwen2-VL, fp32, CPU
    python benchmarks/bench_trainer.py --shape 2b      # Qwen2-VL-2B-shaped, random weights, bf16, GPU
    python benchmarks/bench_trainer.py --quick         # one measured step

Each trainer runs in its own process on the same checkpoint directory and the same prompts
(r1vl.data.synthetic's task, one image each): train.py with --ignore_eos, and
benchmarks/trl_trainer_driver.py (TRL's GRPOTrainer, skipped when trl is not installed) with
min_new_tokens, so every completion is exactly max_completion_length tokens on both sides.
Shared settings: G, completions per optimizer step, max_completion_length, beta, learning rate,
temperature, loss_type, dtype, one optimizer step per rollout, pixel bounds, seed.

Reported per trainer: the median step (by step time) of its measured steps, pooled over
--rounds runs of each trainer taken in turn (ours, TRL, ours, TRL, ...), each run's warm-up
steps dropped:
- tokens_per_s: (prompt + completion tokens of the step's sequences, image placeholders
  included) / step seconds, train.py's own definition, computed the same way by the driver.
- time_step, time_rollout (sampling, rewards, advantages; TRL's also its second pass of the
  images through the processor; ours is train.py's time_sample + time_score), time_reference
  (reference log-probs), time_update (policy forward + backward, optimizer step), seconds; they
  add up to time_step. time_generate: the generation alone (TRL's tokenizing, model.generate,
  decoding; ours is train.py's time_sample), the larger part of the rollout.
- time_reward: TRL's, measured (a seeded random number per completion); ours is an estimate,
  since train.py's time_score also holds the advantages: r1vl.rewards.score_groups on the same
  number of random completions of the same length, timed here.
- peak_memory_gb: r1vl.run.metrics.peak_memory_gb in both processes: torch.cuda.max_memory_allocated
  on GPU, the process's peak resident set size (ru_maxrss) on CPU, since the process started
  (so on CPU it includes each side's imports).
- tokens_per_s_best: at the fastest measured step (the least disturbed by anything else on the
  machine); speedup_best is the ratio of those.
Rows are appended to benchmarks/results/trainer_vs_trl.csv with the device, versions, commit,
settings and the machine's load average around each run (a shared CPU makes the tiny figures
noisy), and a table is printed last; speedup_vs_trl = our tokens/s over TRL's.

--shape tiny: the built-in tiny Qwen2-VL (r1vl.tiny.write_tiny_checkpoint), fp32, on the CPU
even where there is a GPU, one thread per trainer; 56 x 56 images (4 merged image tokens).

--shape 2b: Qwen2-VL-2B's architecture (Qwen/Qwen2-VL-2B-Instruct's config.json: text hidden
1536, 28 layers, 12 query / 2 key-value heads, MLP 8960, vocabulary 151936, tied embeddings,
rope theta 1e6, M-RoPE sections 16/24/24; vision tower depth 32, width 1280, 16 heads, MLP
ratio 4, merger to 1536) with random weights, written once per run. It reuses the tiny
byte-level BPE tokenizer (at most 1024 ids, all below 151936; its special-token ids go in
the config), so the model samples ids the tokenizer cannot decode: those decode to nothing,
which changes only what the rewards read, not the compute. Images are 448 x 448 (256 merged
image tokens).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_csv, environment, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "benchmarks" / "trl_trainer_driver.py"

# Per shape: the model, the data and the step. Both trainers get exactly these.
SHAPES = {
    "tiny": dict(device="cpu", threads=1, dtype="float32", num_generations=4, batch_size=16, max_prompt_length=128,
                 max_completion_length=128, image_size=56, steps=5, warmup=1, rounds=2, micro_batch_tokens=1024),
    "2b": dict(device="cuda", threads=0, dtype="bfloat16", num_generations=4, batch_size=16, max_prompt_length=512,
               max_completion_length=512, image_size=448, steps=3, warmup=1, rounds=1, micro_batch_tokens=16384),
}
# micro_batch_tokens is r1vl's own knob (TRL runs the step's sequences as one padded batch):
# on a CPU the packed attention is sdpa with a block-diagonal (T, T) mask, so the tiny shape
# uses the built-in demo's 1024 (TINY_DEFAULTS); on a GPU the varlen kernels take 16384.
# threads: OMP/MKL threads of both trainers on a CPU (0 = torch's default). One: on a shared
# machine, threads that wait on each other at every op's barrier turn someone else's load into
# ten-fold slower steps, and one thread each keeps the comparison stable.
COMMON = dict(beta=0.04, lr=1e-6, temperature=1.0, loss_type="grpo", seed=0)
TIME_KEYS = ("time_step", "time_rollout", "time_reference", "time_update")

# -------------------------------------------------------------------------------- checkpoints


def qwen2_vl_2b_config(tokenizer):
    """Qwen2-VL-2B's architecture with the given tokenizer's special-token ids."""
    from transformers import Qwen2VLConfig

    from r1vl.tiny import SPECIAL_TOKENS

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                num_attention_heads=12, num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-6,
                max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, hidden_act="quick_gelu",
                  in_channels=3, patch_size=14, temporal_patch_size=2, spatial_merge_size=2)
    return Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)


def write_2b_checkpoint(out_dir: Path, texts: list[str], min_pixels: int, max_pixels: int, seed: int = 0) -> Path:
    """A random bf16 Qwen2-VL-2B-shaped checkpoint (about 4.4 GB) with the tiny tokenizer."""
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from r1vl.tiny import build_tokenizer

    tokenizer = build_tokenizer(texts)
    config = qwen2_vl_2b_config(tokenizer)
    torch.manual_seed(seed)
    # Initialised on the GPU when there is one: 2.2e9 random draws take minutes on a CPU.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the trainers run in other processes and need the memory back
    tokenizer.save_pretrained(out_dir)
    Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(out_dir)
    return out_dir


def prepare(shape: str, workdir: Path, settings: dict) -> tuple[Path, Path]:
    """The synthetic task and the checkpoint for a shape; returns (data.jsonl, checkpoint dir)."""
    from r1vl.data.records import load_examples
    from r1vl.data.synthetic import write_dataset
    from r1vl.tiny import write_tiny_checkpoint

    data = write_dataset(workdir / "data", n=64, seed=0, image_size=settings["image_size"])
    examples = load_examples(data).items
    texts = [e.problem for e in examples] + [e.solution for e in examples]
    pixels = settings["image_size"] ** 2
    model_dir = workdir / f"model-{shape}"
    if shape == "tiny":
        write_tiny_checkpoint(model_dir, texts, seed=0, max_pixels=pixels, min_pixels=pixels)
    else:
        write_2b_checkpoint(model_dir, texts, min_pixels=pixels, max_pixels=pixels)
    return data, model_dir


# -------------------------------------------------------------------------------- runs


def _env(threads: int) -> dict:
    """The environment both trainers run in."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)  # each trainer picks its own kernels
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def _run(cmd: list[str], log: Path, threads: int) -> None:
    with open(log, "w") as f:
        result = subprocess.run(cmd, cwd=ROOT, env=_env(threads), stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({result.returncode}); last lines of {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-30:]))


def run_ours(data: Path, model_dir: Path, settings: dict, workdir: Path, tag: str) -> list[dict]:
    """train.py's GRPO records (metrics.jsonl), one per step, warm-up steps included."""
    run_dir = workdir / f"r1vl-run{tag}"
    pixels = str(settings["image_size"] ** 2)
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", str(model_dir), "--data", str(data),
           "--run_dir", str(run_dir), "--stage", "grpo", "--num_steps", str(settings["warmup"] + settings["steps"]),
           "--ignore_eos", "true", "--num_generations", str(settings["num_generations"]),
           "--batch_size", str(settings["batch_size"]), "--max_prompt_length", str(settings["max_prompt_length"]),
           "--max_completion_length", str(settings["max_completion_length"]), "--beta", str(COMMON["beta"]),
           "--lr", str(COMMON["lr"]), "--temperature", str(COMMON["temperature"]),
           "--loss_type", COMMON["loss_type"], "--dtype", settings["dtype"], "--seed", str(COMMON["seed"]),
           "--device", settings["device"], "--min_pixels", pixels, "--max_pixels", pixels, "--reward_symbolic", "false",
           "--micro_batch_tokens", str(settings["micro_batch_tokens"]), "--eval_prompts", "0",
           "--save_final", "false", "--progress", "false"]
    _run(cmd, workdir / f"r1vl{tag}.log", settings["threads"])
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r.get("stage") == "grpo"]
    for r in records:  # the table's phases, as the TRL driver cuts them
        r["time_rollout"] = r["time_sample"] + r["time_score"]
    return records


def run_trl(data: Path, model_dir: Path, settings: dict, workdir: Path, tag: str) -> list[dict]:
    """The driver's per-step records, warm-up steps included."""
    out = workdir / f"trl-steps{tag}.jsonl"
    out.unlink(missing_ok=True)
    pixels = str(settings["image_size"] ** 2)
    cmd = [sys.executable, str(DRIVER), "--model", str(model_dir), "--data", str(data), "--out", str(out),
           "--num_steps", str(settings["warmup"] + settings["steps"]),
           "--num_generations", str(settings["num_generations"]), "--batch_size", str(settings["batch_size"]),
           "--max_completion_length", str(settings["max_completion_length"]), "--beta", str(COMMON["beta"]),
           "--lr", str(COMMON["lr"]), "--temperature", str(COMMON["temperature"]),
           "--loss_type", COMMON["loss_type"], "--dtype", settings["dtype"], "--seed", str(COMMON["seed"]),
           "--device", settings["device"], "--min_pixels", pixels, "--max_pixels", pixels]
    _run(cmd, workdir / f"trl{tag}.log", settings["threads"])
    return [json.loads(line) for line in out.read_text().splitlines()]


def after_warmup(records: list[dict], warmup: int) -> list[dict]:
    """One run's records without its first `warmup` steps (compilation, allocator growth)."""
    if len(records) <= warmup:
        raise ValueError(f"no steps left after dropping {warmup} warm-up step(s) of {len(records)}")
    return records[warmup:]


def median_step(records: list[dict]) -> dict:
    """The step with the median step time (the lower middle for an even count): one real step,
    so that its time split adds up."""
    return sorted(records, key=lambda r: r["time_step"])[(len(records) - 1) // 2]


def our_reward_seconds(data: Path, model_dir: Path, settings: dict, reps: int = 3) -> float:
    """Median seconds r1vl's rule-based rewards (as configured above: exact matching) take to
    score one step's completions: batch_size random completions of max_completion_length ids
    drawn from the tokenizer's vocabulary, decoded."""
    from transformers import AutoTokenizer

    from r1vl.data.records import load_examples
    from r1vl.rewards import RewardConfig, score_groups

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    examples = load_examples(data).items
    G, B, L = settings["num_generations"], settings["batch_size"], settings["max_completion_length"]
    rng = random.Random(0)
    texts = [tokenizer.decode([rng.randrange(len(tokenizer)) for _ in range(L)], skip_special_tokens=True)
             for _ in range(B)]
    grouped = [texts[p * G:(p + 1) * G] for p in range(B // G)]
    config = RewardConfig(alpha=0.1, normalize=False, symbolic=False)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        score_groups(grouped, examples[:B // G], config)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -------------------------------------------------------------------------------- main


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("transformers", "trl"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = ""
    return out


def timed(label: str, fn):
    """fn() and the machine's load average before -> after it (the CPU figures are only as
    quiet as the machine was)."""
    before, t0 = os.getloadavg()[0], time.perf_counter()
    out = fn()
    after = os.getloadavg()[0]
    print(f"{label} done in {time.perf_counter() - t0:.0f} s (load average {before:.1f} -> {after:.1f})", flush=True)
    return out, f"{before:.1f}->{after:.1f}"


def make_row(env: dict, trainer: str, shape: str, settings: dict, steps: list[dict], time_generate: str,
             time_reward: float, note: str) -> dict:
    step = median_step(steps)
    tokens = step["tokens_per_s"] * step["time_step"]
    return dict(env, trainer=trainer, shape=shape, threads=settings["threads"] or "",
                dtype=settings["dtype"], G=settings["num_generations"],
                batch=settings["batch_size"], max_prompt_length=settings["max_prompt_length"],
                micro_batch_tokens=settings["micro_batch_tokens"] if trainer == "r1vl" else "",
                completion_len=f"{step['completion_len']:.0f}", beta=COMMON["beta"], lr=COMMON["lr"],
                temperature=COMMON["temperature"], loss_type=COMMON["loss_type"], rounds=settings["rounds"],
                warmup_steps=settings["warmup"], measured_steps=settings["steps"] * settings["rounds"],
                tokens_per_step=f"{tokens:.0f}",
                tokens_per_s=f"{step['tokens_per_s']:.1f}",
                tokens_per_s_best=f"{max(s['tokens_per_s'] for s in steps):.1f}",
                **{k: f"{step[k]:.3f}" for k in TIME_KEYS},
                time_generate=time_generate, time_reward=f"{time_reward:.2g}",
                peak_memory_gb=f"{step['peak_memory_gb']:.2f}", speedup_vs_trl="", speedup_best="", note=note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default="tiny")
    parser.add_argument("--steps", type=int, default=0, help="measured steps per run (default: the shape's)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="runs of each trainer, alternating, their measured steps pooled, so that a shared "
                             "machine's load falls on both (default: the shape's)")
    parser.add_argument("--quick", action="store_true", help="one measured step")
    parser.add_argument("--no-save", action="store_true", help="do not append to the results CSV")
    parser.add_argument("--skip-trl", action="store_true", help="run r1vl's trainer only")
    parser.add_argument("--workdir", default="", help="where data, checkpoint, runs and logs go (default: a temp dir)")
    args = parser.parse_args()

    settings = dict(SHAPES[args.shape])
    settings["steps"] = 1 if args.quick else args.steps or settings["steps"]
    settings["rounds"] = 1 if args.quick else args.rounds or settings["rounds"]
    if settings["device"] == "cuda" and not torch.cuda.is_available():
        parser.error(f"--shape {args.shape} runs on a GPU and there is none")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-trainer-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"shape {args.shape}: {settings}, {COMMON}; work dir {workdir}", flush=True)
    data, model_dir = prepare(args.shape, workdir, settings)

    with_trl = not args.skip_trl and importlib.util.find_spec("trl") is not None
    if not args.skip_trl and not with_trl:
        print("trl is not installed: r1vl only (pip install -c constraints.txt trl)")
    steps = {"r1vl": [], "trl": []}
    loads = {"r1vl": [], "trl": []}
    runners = {"r1vl": run_ours, "trl": run_trl} if with_trl else {"r1vl": run_ours}
    for r in range(settings["rounds"]):
        for name, runner in runners.items():
            records, load = timed(f"{name} round {r + 1}",
                                  lambda: runner(data, model_dir, settings, workdir, f"-{r + 1}"))
            steps[name] += after_warmup(records, settings["warmup"])
            loads[name].append(load)

    env = {**environment(), **_versions()}
    env["device"] = torch.cuda.get_device_name() if settings["device"] == "cuda" else "cpu"
    ours = median_step(steps["r1vl"])
    rows = [make_row(env, "r1vl", args.shape, settings, steps["r1vl"], f"{ours['time_sample']:.3f}",
                     our_reward_seconds(data, model_dir, settings),
                     f"load avg {', '.join(loads['r1vl'])}; time_reward estimated apart (rule-based rewards, "
                     "exact matching), part of time_rollout")]
    if with_trl:
        trl = median_step(steps["trl"])
        rows.append(make_row(env, "trl", args.shape, settings, steps["trl"], f"{trl['time_generate']:.3f}",
                             trl["time_reward"], f"load avg {', '.join(loads['trl'])}; random reward"))
        for column, key in (("speedup_vs_trl", "tokens_per_s"), ("speedup_best", "tokens_per_s_best")):
            rows[0][column] = f"{float(rows[0][key]) / float(rows[1][key]):.2f}"

    if not args.no_save:
        print(f"appended {len(rows)} rows to {os.path.relpath(append_csv('trainer_vs_trl.csv', rows))}")
    print_table(rows, ["trainer", "shape", "device", "tokens_per_step", "tokens_per_s", *TIME_KEYS, "time_generate",
                       "time_reward", "peak_memory_gb", "speedup_vs_trl", "tokens_per_s_best", "speedup_best"])


if __name__ == "__main__":
    main()
