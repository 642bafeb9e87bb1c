"""The GRPO update with shared prompts against the unshared packing: tokens computed and time.

    python benchmarks/bench_update.py                      # small Qwen2-VL, CPU, paper's shape
    python benchmarks/bench_update.py --rounds 1 --steps 1 --no-save   # a quick look
    python benchmarks/bench_update.py --model 2b           # Qwen2-VL-2B's shape on a CUDA GPU, bf16

One "step" is what one rank updates on in one optimizer step at R1-VL's setting
(batch_size 4 = one prompt x G = 4 completions): a prompt of 512 tokens holding one image
(400 image tokens: a 40 x 40-patch grid, 2 x 2 merge) and 4 completions of 50-1024 tokens.
The timed work is the update's forward + backward of all that step's packed micro-batches
(the fused GRPO loss from hidden states with a KL term; micro_batch_tokens 16384, so one
micro-batch each), as train.py runs it; packing and the reference log-probs are not timed.

Providers:
  - unshared: pack(...) as before this change: every completion with its own prompt copy
    (the image encoded once per micro-batch either way);
  - shared:   plan_shared_microbatches + pack(..., share_prompts=True): [prompt, c1..c4].

The machine may be shared with other work, so the providers alternate within one run
(round r runs unshared then shared on even r, the other order on odd r) on the same steps;
each step's median over rounds is taken, and their mean reported, both as wall time and as
the process's CPU time (time.process_time: with one thread, the time this process itself
ran, which other processes' load disturbs far less than the wall clock). Completion
lengths come from two spreads: "uniform" (50-1024, as the issue states the range) and
"loguniform" (50-1024, log-uniform: most completions short, a few long, closer to real
rollouts). With P = 512 and G = 4 the prompt copies are 34% of the unshared tokens at the
uniform spread's mean completion (537), so no update can gain more than 1.51x there.

The model is a small Qwen2-VL built from a config (no download): by default 2 text layers of
width 512 (intermediate 3072, 8 query / 2 key-value heads of 64, vocabulary 4096), or with
--width 256 4 layers of width 256 (4 query heads); a one-block vision tower of width 128; in
float32 on the CPU with --threads threads (default 1). --model 2b: Qwen2-VL-2B's architecture
(random weights) in bf16 on a CUDA GPU with the varlen kernels (flash-attn, else torch's
varlen_attn) and the Triton loss; CPU time is then meaningless, wall time counts.

What sharing saves is the prompt copies' linear layers and their causal self-attention; a
completion's attention over the prompt stays, and so do the lm_head and loss. At these contexts (~1000 tokens) attention is a larger share of a narrow
model's work than of Qwen2-VL-2B's (width 1536: about 6% of a layer's FLOPs, against about
16% at width 512 and 27% at width 256), so the narrower the model, the further its speedup
falls below the ratio of tokens computed.
"""
import argparse
import math
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from _common import append_csv, environment, print_table  # noqa: E402

from r1vl.model.attention import use_varlen_attention  # noqa: E402
from r1vl.update.losses import completion_logprobs, microbatch_weight, policy_loss  # noqa: E402
from r1vl.update.microbatches import plan_microbatches, plan_shared_microbatches  # noqa: E402
from r1vl.update.packing import Sequence, pack  # noqa: E402

G, PROMPT_TOKENS, GRID = 4, 512, (1, 40, 40)  # 40 x 40 patches -> 400 image tokens
MIN_COMPLETION, MAX_COMPLETION, MICRO_BATCH_TOKENS = 50, 1024, 16384
VOCAB, IMAGE, VIDEO, VISION_START, VISION_END = 4096, 4090, 4091, 4092, 4093  # the small model's


# text width -> (layers, query heads): head dim 64, 2 key-value heads, intermediate 6 x width.
WIDTHS = {256: (4, 4), 512: (2, 8)}


def small_model(width: int) -> torch.nn.Module:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    layers, heads = WIDTHS[width]
    text = dict(vocab_size=VOCAB, hidden_size=width, intermediate_size=6 * width, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
                bos_token_id=None, eos_token_id=None, pad_token_id=0)
    vision = dict(depth=1, embed_dim=128, hidden_size=width, num_heads=2, mlp_ratio=2, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                           vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).float()


def qwen2_vl_2b() -> torch.nn.Module:
    """Qwen2-VL-2B's architecture, randomly initialised (timing only), the small model's
    special-token ids (4090-4093) inside its vocabulary."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                num_attention_heads=12, num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-6,
                max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                bos_token_id=None, eos_token_id=None, pad_token_id=0)
    vision = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, hidden_act="quick_gelu",
                  patch_size=14, temporal_patch_size=2, spatial_merge_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                           vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
                           tie_word_embeddings=True)
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config)


def completion_lengths(rng: random.Random, spread: str) -> list[int]:
    if spread == "uniform":
        return [rng.randint(MIN_COMPLETION, MAX_COMPLETION) for _ in range(G)]
    low, high = math.log(MIN_COMPLETION), math.log(MAX_COMPLETION)
    return [int(round(math.exp(rng.uniform(low, high)))) for _ in range(G)]


def step_sequences(rng: random.Random, spread: str) -> list[Sequence]:
    """One prompt of PROMPT_TOKENS tokens with its image, and G completions."""
    t, h, w = GRID
    image_tokens = t * h * w // 4
    text = PROMPT_TOKENS - image_tokens - 2
    head = [rng.randrange(1, 4000) for _ in range(text // 2)]
    tail = [rng.randrange(1, 4000) for _ in range(text - text // 2)]
    prompt = torch.tensor(head + [VISION_START] + [IMAGE] * image_tokens + [VISION_END] + tail)
    pixels = torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
    grid = torch.tensor([GRID])
    return [Sequence(prompt, torch.tensor([rng.randrange(1, 4000) for _ in range(n)]), pixels, grid)
            for n in completion_lengths(rng, spread)]


def microbatches(sequences: list[Sequence], model, shared: bool) -> list:
    """[(indices, PackedBatch)] as train.py's packed_microbatches builds them."""
    if shared:
        plan = plan_shared_microbatches(sequences, MICRO_BATCH_TOKENS).microbatches
    else:
        lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in sequences]
        plan = plan_microbatches(lengths, MICRO_BATCH_TOKENS, groups=[0] * len(sequences))
    return [(idx, pack([sequences[i] for i in idx], model, share_prompts=shared)) for idx in plan]


def update(model, micro, advantages, ref_logps, S: int, N: int, impl: str) -> None:
    """Forward + backward of every micro-batch of one step, weighted as the trainer does."""
    model.zero_grad(set_to_none=True)
    for (idx, packed), ref in zip(micro, ref_logps):
        out = policy_loss(model, packed, advantages[idx], None, ref, impl=impl, temperature=1.2, beta=0.04,
                          loss_type="grpo", max_completion_length=MAX_COMPLETION, num_items_in_batch=N)
        (out.loss * microbatch_weight("grpo", len(idx), packed.target_ids.numel(), S, N)).backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="steps (one prompt x G each) per spread")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both providers")
    parser.add_argument("--spreads", default="uniform,loguniform", help="completion-length spreads, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, choices=tuple(WIDTHS), default=512, help="text width of the small model")
    parser.add_argument("--model", choices=("small", "2b"), default="small",
                        help="small (CPU) or Qwen2-VL-2B's architecture (random weights; a CUDA GPU, bf16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true", help="do not append to the results CSV")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.model == "2b" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--model 2b needs a CUDA GPU")
    if args.model == "2b":
        model = qwen2_vl_2b().to(device, torch.bfloat16)
    else:
        model = small_model(args.width)
    backend = use_varlen_attention(model, None if device.type == "cuda" else "sdpa")
    impl = "triton" if device.type == "cuda" else "torch"
    env = environment()
    load_before = _load()
    rows = []
    for spread in args.spreads.split(","):
        rng = random.Random(args.seed)
        steps = []
        for _ in range(args.steps):
            sequences = step_sequences(rng, spread)
            N = sum(len(s.completion_ids) for s in sequences)
            advantages = torch.randn(len(sequences), device=device)
            prepared = {}
            for shared in (False, True):
                micro = [(idx, pb.to(device)) for idx, pb in microbatches(sequences, model, shared)]
                ref = [completion_logprobs(model, pb, 1.2, impl) for _, pb in micro]  # stands in for the reference
                prepared[shared] = (micro, ref)
            steps.append((sequences, N, advantages, prepared))
        times = {False: [[] for _ in steps], True: [[] for _ in steps]}
        cpu = {False: [[] for _ in steps], True: [[] for _ in steps]}
        for r in range(args.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            for k, (sequences, N, advantages, prepared) in enumerate(steps):
                for shared in order:
                    micro, ref = prepared[shared]
                    _sync(device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    update(model, micro, advantages, ref, len(sequences), N, impl)
                    _sync(device)
                    times[shared][k].append(time.perf_counter() - t0)
                    cpu[shared][k].append(time.process_time() - c0)
        prompt_tokens = len(steps[0][0][0].prompt_ids)
        for shared in (False, True):
            per_step = [statistics.median(t) for t in times[shared]]
            cpu_per_step = [statistics.median(t) for t in cpu[shared]]
            computed = sum(pb.num_tokens for _, _, _, p in steps for _, pb in p[shared][0])
            useful = sum(prompt_tokens + N for _, N, _, _ in steps)  # prompts once + completions
            rows.append({**env, "transformers": _version("transformers"),
                         "provider": "shared" if shared else "unshared",
                         "model": args.model, "attention": backend,
                         "text_width": args.width if args.model == "small" else 1536,
                         "text_layers": WIDTHS[args.width][0] if args.model == "small" else 28,
                         "spread": spread, "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
                         "G": G, "prompt_tokens": prompt_tokens,
                         "completion_tokens": sum(N for _, N, _, _ in steps), "tokens_computed": computed,
                         "computed_over_prompts_plus_completions": round(computed / useful, 4),
                         "update_s_per_step": round(statistics.mean(per_step), 4),
                         "update_cpu_s_per_step": round(statistics.mean(cpu_per_step), 4),
                         "speedup": "", "speedup_cpu": ""})
        unshared_row, shared_row = rows[-2], rows[-1]
        for key, time_key in (("speedup", "update_s_per_step"), ("speedup_cpu", "update_cpu_s_per_step")):
            shared_row[key] = round(unshared_row[time_key] / shared_row[time_key], 3)
    note = f"load avg {load_before} -> {_load()}; providers alternate within the run; {platform.processor() or 'cpu'}"
    for row in rows:
        row["note"] = note
    print_table(rows, ["provider", "spread", "completion_tokens", "tokens_computed",
                       "computed_over_prompts_plus_completions", "update_s_per_step", "speedup",
                       "update_cpu_s_per_step", "speedup_cpu"])
    print(note)
    if not args.no_save:
        print("appended to", append_csv("update_cpu.csv" if env["device"] == "cpu" else "update_gpu.csv", rows))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
