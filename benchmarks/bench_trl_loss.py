"""Peak memory (and time) of TRL's GRPO loss step with and without r1vl_kernels.trl.

    python benchmarks/bench_trl_loss.py                    # V = 65536, 4096 completion tokens
    python benchmarks/bench_trl_loss.py --vocab 151936 --hidden 1536

One loss + backward of GRPOTrainer._compute_loss (trl 1.16: its chunked fused lm_head, which
already avoids the full (B, T, V) logits, plus its loss in PyTorch) against
FusedGRPOTrainer._compute_loss (the same loss by grpo_loss_from_hidden), on a 1-layer Qwen2
with the given vocabulary and width, B sequences of a P-token prompt and T completion tokens
(all scored, beta = 0.04, token-level importance ratios off-policy). "backbone" is the floor
any loss pays: the same forward + backward with the loss replaced by a sum of the hidden
states. Each provider runs in its own process. Peak memory is the growth over what the
process holds just before the step: torch.cuda.max_memory_allocated on GPU (model in bf16),
the peak resident set size on CPU (fp32; the process's lifetime peak, and nothing before the
step allocates as much). Rows are appended to benchmarks/results/trl_loss_memory.csv.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from _common import append_csv, environment, print_table  # noqa: E402

PROVIDERS = ("backbone", "trl", "fused")


def child(opts) -> dict:
    import psutil
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from r1vl.tiny import build_tokenizer
    from r1vl_kernels.trl import FusedGRPOTrainer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = build_tokenizer(["benchmark"] * 4, vocab_size=300)
    tokenizer.padding_side = "left"
    config = Qwen2Config(vocab_size=opts.vocab, hidden_size=opts.hidden, intermediate_size=2 * opts.hidden,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=opts.prompt + opts.completion, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype)
    args = GRPOConfig(output_dir=os.path.join(opts.tmp, opts.provider), per_device_train_batch_size=opts.batch,
                      num_generations=2, max_completion_length=opts.completion, report_to="none",
                      use_cpu=device == "cpu", bf16=False, save_strategy="no", beta=0.0)
    cls = FusedGRPOTrainer if opts.provider == "fused" else GRPOTrainer
    trainer = cls(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                  train_dataset=Dataset.from_list([{"prompt": "x"}] * opts.batch), processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    trainer.beta = 0.04
    model = trainer.model

    g = torch.Generator().manual_seed(0)
    B, P, T = opts.batch, opts.prompt, opts.completion
    batch = dict(prompt_ids=torch.randint(2, opts.vocab, (B, P), generator=g),
                 prompt_mask=torch.ones(B, P, dtype=torch.long),
                 completion_ids=torch.randint(2, opts.vocab, (B, T), generator=g),
                 completion_mask=torch.ones(B, T, dtype=torch.long), advantages=torch.randn(B, generator=g),
                 old_per_token_logps=-11.0 + 0.1 * torch.randn(B, T, generator=g),
                 ref_per_token_logps=-11.0 + 0.1 * torch.randn(B, T, generator=g),
                 num_items_in_batch=torch.tensor(float(B * T)))
    batch = {k: v.to(device) for k, v in batch.items()}

    def step():
        model.zero_grad(set_to_none=True)
        if opts.provider == "backbone":
            ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
            hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
            loss = hidden[:, -T - 1:-1].float().sum() * 1e-6
        else:
            loss = trainer._compute_loss(model, batch)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = psutil.Process().memory_info().rss
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 < base + 64 * 2**20
    seconds = []
    for _ in range(opts.reps):
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return dict(provider=opts.provider, peak_mib=round(peak / 2**20, 1), seconds=round(min(seconds), 3),
                dtype=str(dtype).replace("torch.", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--completion", type=int, default=512)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--provider", choices=PROVIDERS)
    parser.add_argument("--tmp", default="/tmp/bench_trl_loss")
    parser.add_argument("--no-save", action="store_true")
    opts = parser.parse_args()
    if opts.provider:
        print(json.dumps(child(opts)))
        return
    rows = []
    for provider in PROVIDERS:
        cmd = [sys.executable, __file__, "--provider", provider] + [
            f"--{k}={getattr(opts, k)}" for k in ("vocab", "hidden", "batch", "prompt", "completion", "reps", "tmp")]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{provider} failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(dict(environment(), vocab=opts.vocab, hidden=opts.hidden, batch=opts.batch,
                         completion_tokens=opts.batch * opts.completion, **result))
    floor = rows[0]["peak_mib"]
    for row in rows:
        row["loss_mib"] = round(row["peak_mib"] - floor, 1)
    print_table(rows, ["device", "provider", "dtype", "vocab", "hidden", "completion_tokens", "peak_mib", "loss_mib",
                       "seconds"])
    if not opts.no_save:
        print("appended to", append_csv("trl_loss_memory.csv", rows))


if __name__ == "__main__":
    main()
