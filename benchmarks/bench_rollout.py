"""Rollout speed: the same prompts through three samplers.

    python benchmarks/bench_rollout.py                 # --shape tiny: the built-in run's shape, CPU
    python benchmarks/bench_rollout.py --quick         # fewer tokens, one round
    python benchmarks/bench_rollout.py --shape 2b      # GPU: Qwen2-VL-2B-shaped, bf16 (to be measured)

Providers, each given the same encoded prompts (r1vl.data.synthetic's task, r1vl.data.prompts' chat
format), G, max_new_tokens, temperature 1 and top_p 1:
- reference: reference_sampler.generate_reference, the trainer's previous sampler
  (DynamicCache grown by torch.cat, every sequence decoded until the longest stops);
- hf_generate: transformers' model.generate on the left-padded batch of prompts with
  num_return_sequences=G, do_sample, top_k=0 (the image is encoded G times there);
- fast: r1vl.sampling.generate.generate (in-place shared-prefix cache, compaction; compiled step on GPU).

Two length modes:
- stop: completions end at an EOS set of --eos_tokens ordinary token ids (a random model puts
  about 1/V of its mass on each), so lengths spread as they do in RL: many stop early, a few
  run to max_new_tokens. Each provider samples its own lengths; tokens/s counts the tokens
  actually sampled.
- forced: no EOS (min_new_tokens for HF): every completion is max_new_tokens long.

Reported per provider and mode, each the median of --rounds runs taken in turn (reference,
hf, fast, reference, ...) after a warm-up of each on the whole batch:
- tokens, seconds, tokens_per_s: sampled tokens, rollout wall time, their ratio;
  speedup_vs_reference: tokens_per_s over the reference's;
- cpu_seconds, cpu_speedup_vs_reference (CPU only): the process's CPU time and the ratio of
  tokens per CPU second. On a machine shared with other work, wall time also counts the time
  spent waiting for a core, CPU time only the sampler's own work;
- decode_efficiency: sampled tokens / decode slots (rows decoded, summed over positions);
- kv_cache_mb: the KV cache the sampler holds at its largest, from its layout (reference and
  HF: every sequence its padded prompt and every step's token; fast: each prompt once plus
  max_new_tokens columns per completion); peak_mb: torch.cuda.max_memory_allocated (GPU only).
Rows are appended to benchmarks/results/rollout.csv with device, versions, commit and load.

--shape tiny: r1vl.tiny's Qwen2-VL (4 layers, width 128), fp32, 32 prompts x G=8, up to 160
tokens, 56 x 56 images, one CPU thread (a shared machine's other work slows multi-threaded
ops by waits at each barrier).
--shape 2b: Qwen2-VL-2B's architecture (benchmarks/bench_trainer.py's config), random weights,
bf16, 16 prompts x G=4 = 64 sequences x up to 1024 tokens, 448 x 448 images; needs a GPU.
The fast sampler's step is compiled there (inductor, CUDA graphs per batch bucket); the
warm-up pays the compile. Not yet measured: no GPU was available when this was written.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import append_csv, environment, print_table  # noqa: E402

SHAPES = {
    "tiny": dict(device="cpu", dtype=torch.float32, prompts=32, G=8, max_new_tokens=160, image_size=56, threads=1),
    "2b": dict(device="cuda", dtype=torch.bfloat16, prompts=16, G=4, max_new_tokens=1024, image_size=448, threads=0),
}


def build(shape: str, settings: dict):
    """(model, prompts, tokenizer) for a shape: the synthetic task encoded like train.py does."""
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from r1vl.data.prompts import encode_prompt
    from r1vl.data.records import load_examples
    from r1vl.data.synthetic import write_dataset
    from r1vl.tiny import build_model, build_tokenizer

    size = settings["image_size"]
    pixels = size * size
    root = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    examples = load_examples(write_dataset(root, n=settings["prompts"], seed=0, image_size=size)).items
    tokenizer = build_tokenizer([e.problem for e in examples] + [e.solution for e in examples])
    device = torch.device(settings["device"])
    if shape == "tiny":
        model = build_model(tokenizer, seed=0)
    else:
        from bench_trainer import qwen2_vl_2b_config

        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen2VLForConditionalGeneration(qwen2_vl_2b_config(tokenizer))
    model = model.to(device, settings["dtype"]).eval()
    model.set_attn_implementation("sdpa")
    processor = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels)
    merge = model.config.vision_config.spatial_merge_size
    prompts = [encode_prompt(e, tokenizer, processor, merge, pixels, pixels) for e in examples]
    return model, prompts, tokenizer


def stop_tokens(tokenizer, n: int) -> list[int]:
    """n ordinary (non-special) token ids, spread over the vocabulary."""
    special = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(len(tokenizer)) if i not in special]
    step = max(1, len(ordinary) // n)
    return ordinary[::step][:n]


# -------------------------------------------------------------------------------- providers


def run_reference(model, prompts, G, max_new, eos, seed):
    # The previous sampler is kept as the tests' oracle.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "r1vl" / "sampling"))
    from reference_sampler import generate_reference

    out = generate_reference(model, prompts, G, max_new, eos, generator=_generator(model, seed))
    return [len(i) for i in out.ids], out.decode_slots, _reference_cache_bytes(model, prompts, G, out)


def run_fast(model, prompts, G, max_new, eos, seed):
    from r1vl.sampling.generate import generate

    out = generate(model, prompts, G, max_new, eos, generator=_generator(model, seed), progress=False)
    return [len(i) for i in out.ids], out.decode_slots, _fast_cache_bytes(model, prompts, G, max_new)


def run_hf(model, prompts, G, max_new, eos, seed):
    """transformers' generate, all prompts in one left-padded batch, G return sequences each."""
    device = model.lm_head.weight.device
    config = model.config
    longest = max(p.ids.numel() for p in prompts)
    pad = config.text_config.pad_token_id or 0
    ids = torch.full((len(prompts), longest), pad, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - p.ids.numel():] = p.ids
        mask[i, longest - p.ids.numel():] = 1
    ids, mask = ids.to(device), mask.to(device)
    torch.manual_seed(seed)
    forced = dict(min_new_tokens=max_new) if not eos else {}
    out = model.generate(
        input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == config.image_token_id).int(),
        pixel_values=torch.cat([p.pixel_values for p in prompts]).to(device, model.dtype),
        image_grid_thw=torch.cat([p.image_grid_thw for p in prompts]).to(device),
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new, num_return_sequences=G,
        eos_token_id=eos or None, pad_token_id=pad, **forced)
    completions = out[:, longest:].cpu()
    lengths = []
    for row in completions:
        hits = torch.isin(row, torch.tensor(eos, dtype=torch.int64)).nonzero()
        lengths.append(int(hits[0]) + 1 if len(hits) else row.numel())
    steps = completions.shape[1]
    hidden = config.text_config
    kv = 2 * hidden.num_hidden_layers * hidden.num_key_value_heads * (hidden.hidden_size // hidden.num_attention_heads)
    return lengths, len(prompts) * G * steps, kv * len(prompts) * G * (longest + steps) * model.dtype.itemsize


PROVIDERS = {"reference": run_reference, "hf_generate": run_hf, "fast": run_fast}


def _generator(model, seed):
    return torch.Generator(model.lm_head.weight.device).manual_seed(seed)


def _kv_row_bytes(model) -> int:
    text = model.config.text_config
    return 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) \
        * model.dtype.itemsize


def _reference_cache_bytes(model, prompts, G, out) -> int:
    """The reference's DynamicCache at its end: every sequence holds its padded prompt and
    every step's token."""
    steps = max(len(i) for i in out.ids)
    return _kv_row_bytes(model) * len(prompts) * G * (max(p.ids.numel() for p in prompts) + steps)


def _fast_cache_bytes(model, prompts, G, max_new) -> int:
    """RolloutCache: each prompt once, each completion's max_new_tokens columns."""
    return _kv_row_bytes(model) * (len(prompts) * max(p.ids.numel() for p in prompts) + len(prompts) * G * max_new)


# -------------------------------------------------------------------------------- measuring


def measure(name, model, prompts, G, max_new, eos, seed, device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    lengths, slots, cache_bytes = PROVIDERS[name](model, prompts, G, max_new, eos, seed)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else float("nan")
    return dict(tokens=sum(lengths), seconds=seconds, cpu_seconds=cpu_seconds, slots=slots, peak=peak, kv=cache_bytes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--quick", action="store_true", help="a quarter of the tokens, one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="stop,forced")
    parser.add_argument("--providers", default="reference,hf_generate,fast")
    parser.add_argument("--eos_tokens", type=int, default=8, help="size of the stop set in mode 'stop'")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    settings = dict(SHAPES[args.shape])
    if settings["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--shape {args.shape} needs a GPU")
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    max_new = settings["max_new_tokens"] // (4 if args.quick else 1)
    rounds = 1 if args.quick else args.rounds
    G = settings["G"]
    model, prompts, tokenizer = build(args.shape, settings)
    providers = args.providers.split(",")
    # Warm-up: each provider on the whole batch (first-call costs, the allocator's first
    # growth), the fast sampler for the whole measured length: its compiled step compiles
    # (and records CUDA graphs) once per column bucket, and a shorter warm-up would leave the
    # later buckets' compiles inside the measured round. The others: a quarter of the tokens.
    for name in providers:
        warm_up = max_new if name == "fast" else max(1, max_new // 4)
        measure(name, model, prompts, G, warm_up, [], 0, settings["device"])
    rows = []
    for mode in args.modes.split(","):
        eos = stop_tokens(tokenizer, args.eos_tokens) if mode == "stop" else []
        runs = {name: [] for name in providers}
        for r in range(rounds):
            for name in providers:
                runs[name].append(measure(name, model, prompts, G, max_new, eos, r, settings["device"]))
                load = os.getloadavg()[0]
                print(f"{mode} round {r} {name}: {runs[name][-1]['tokens']} tokens in "
                      f"{runs[name][-1]['seconds']:.2f} s, {runs[name][-1]['cpu_seconds']:.2f} s of CPU "
                      f"(load {load:.1f})", flush=True)
        for name in providers:
            rate = statistics.median(m["tokens"] / m["seconds"] for m in runs[name])
            rows.append(dict(mode=mode, provider=name, sequences=len(prompts) * G, max_new_tokens=max_new,
                             tokens=round(statistics.median(m["tokens"] for m in runs[name])),
                             seconds=round(statistics.median(m["seconds"] for m in runs[name]), 3),
                             tokens_per_s=round(rate, 1),
                             cpu_seconds=round(statistics.median(m["cpu_seconds"] for m in runs[name]), 3),
                             tokens_per_cpu_s=round(statistics.median(m["tokens"] / m["cpu_seconds"]
                                                                      for m in runs[name]), 1),
                             decode_efficiency=round(statistics.median(m["tokens"] / m["slots"]
                                                                       for m in runs[name]), 3),
                             peak_mb=round(max(m["peak"] for m in runs[name]) / 2**20, 1),
                             kv_cache_mb=round(max(m["kv"] for m in runs[name]) / 2**20, 1),
                             rounds=rounds, load=round(os.getloadavg()[0], 1)))
        base = next((row for row in rows if row["mode"] == mode and row["provider"] == "reference"), None)
        for row in rows:
            if row["mode"] == mode:
                row["speedup_vs_reference"] = round(row["tokens_per_s"] / base["tokens_per_s"], 2) if base else ""
                row["cpu_speedup_vs_reference"] = (round(row["tokens_per_cpu_s"] / base["tokens_per_cpu_s"], 2)
                                                   if base and settings["device"] == "cpu" else "")
    env = environment()
    import transformers

    for row in rows:
        row.update(shape=args.shape, dtype=str(settings["dtype"]).replace("torch.", ""),
                   transformers=transformers.__version__, **env)
    print_table(rows, ["mode", "provider", "tokens", "seconds", "tokens_per_s", "speedup_vs_reference", "cpu_seconds",
                       "cpu_speedup_vs_reference", "decode_efficiency", "kv_cache_mb", "peak_mb"])
    if not args.no_save:
        print("appended to", append_csv("rollout.csv", rows))


if __name__ == "__main__":
    main()
