"""The memory plan (r1vl.run.memory_plan) for Qwen2-VL-2B and -7B at the paper's settings, one row
per configuration, and the saved-activation bytes per token per decoder layer measured on CPU.

    python benchmarks/bench_memory.py            # writes benchmarks/results/memory_plan.md

The paper's settings are the trainer's defaults (G = 4, 4 completions per rank per step,
prompts up to 512 tokens with images up to 400000 pixels, completions up to 1024 tokens,
beta 0.04); rows with batch_size 32 fill whole 16384-token micro-batches (the default
micro_batch_tokens), where activations dominate. Every GPU has 80 GiB. The measured column:
one full-width decoder layer in bf16, packed (two sequences), r1vl's sdpa varlen attention,
bytes saved for backward counted with saved_tensors_hooks (benchmarks/saved_tensors.py).
No GPU figures: this file was produced on a CPU-only machine.
"""
import functools
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

from saved_tensors import SavedTensors  # noqa: E402

from r1vl.config import make_config  # noqa: E402
from r1vl.model.attention import register  # noqa: E402
from r1vl.run.memory_check import fixes, plan_for_config  # noqa: E402
from r1vl.run.memory_plan import GiB, ModelShape, load_model_config  # noqa: E402

DEVICE_GIB = 80.0
TOKENS = 256  # of the measured layer


def measured_layer_bytes_per_token(config, checkpointing: bool) -> float:
    from torch.utils.checkpoint import checkpoint
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VLDecoderLayer,
        Qwen2VLRotaryEmbedding,
    )

    text = config.get_text_config()
    text._attn_implementation = register("sdpa")
    layer = Qwen2VLDecoderLayer(text, 0).to(torch.bfloat16).train()
    if checkpointing:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
    x = torch.randn(1, TOKENS, text.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = Qwen2VLRotaryEmbedding(text)(x, torch.arange(TOKENS).view(1, 1, -1).expand(3, 1, -1))
    cu = torch.tensor([0, TOKENS // 2, TOKENS], dtype=torch.int32)
    with SavedTensors(torch.nn.ModuleList([layer]), exclude=[x, cos, sin, cu], count_checkpoint_keywords=False) as s:
        layer(x, position_embeddings=(cos, sin), attention_mask=None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
              max_length_q=TOKENS // 2, max_length_k=TOKENS // 2)
    return (s.bytes + (x.nbytes if checkpointing else 0)) / TOKENS


ROWS = [  # (model, GPUs, --deepspeed, checkpointing, batch_size per rank)
    ("2b", 1, "", False, 4), ("2b", 1, "", True, 4), ("2b", 1, "", False, 32), ("2b", 1, "", True, 32),
    ("2b", 4, "configs/zero2.json", True, 32), ("2b", 4, "configs/zero3.json", True, 32),
    ("7b", 1, "", True, 4), ("7b", 4, "configs/zero2.json", True, 4), ("7b", 4, "configs/zero3.json", False, 4),
    ("7b", 4, "configs/zero3.json", True, 4), ("7b", 4, "configs/zero3.json", True, 32),
    ("7b", 4, "configs/zero3_offload.json", True, 32), ("7b", 1, "configs/zero3_offload.json", True, 4),
]


def main() -> None:
    lines = [__doc__.split("\n\n")[0].strip(), "", f"Command: `python benchmarks/bench_memory.py`; torch "
             f"{torch.__version__}, CPU. Per GPU, GiB; fits = peak <= 92% of {DEVICE_GIB:.0f} GiB.", "",
             "| model | GPUs | engine | ckpt | batch/rank | micro-batch tokens | weights | grads | master | optim | "
             "reference | KV cache | fused decode | act LM | act vision | loss | rollout peak | update peak | fits |",
             "|" + "---|" * 19]
    for name, gpus, ds, ckpt, batch in ROWS:
        cfg = make_config(model=str(ROOT / "configs" / f"qwen2_vl_{name}.json"), plan=True, gpu_memory_gb=DEVICE_GIB,
                          deepspeed=str(ROOT / ds) if ds else "", batch_size=batch,
                          activation_checkpointing="on" if ckpt else "off")
        plan = plan_for_config(cfg, world_size=gpus, on_cuda=True, device_bytes=DEVICE_GIB * GiB)
        g = lambda item: f"{plan.item(item) / GiB:.2f}"  # noqa: E731
        lines.append(f"| {name.upper()} | {gpus} | {plan.engine.name} | {'on' if ckpt else 'off'} | {batch} | "
                     f"{plan.micro_batch_tokens} | {g('weights')} | {g('gradients')} | {g('master weights')} | "
                     f"{g('optimizer state')} | {g('reference model')} | {g('rollout KV cache')} | "
                     f"{g('decode fused weights')} | {g('activations, language model')} | "
                     f"{g('activations, vision tower')} | {g('fused loss backward')} | {plan.rollout_peak / GiB:.1f} | "
                     f"{plan.update_peak / GiB:.1f} | {'yes' if plan.fits else 'NO'} |")
        if not plan.fits:
            lines.append(f"|  | fixes: {'; '.join(fixes(cfg, plan, world_size=gpus, on_cuda=True, device_bytes=DEVICE_GIB * GiB))} |" + " |" * 17)
    lines += ["", "Saved activations per token per decoder layer, bf16, measured on CPU (one full-width layer, "
              f"{TOKENS} packed tokens) against the plan:", "",
              "| model | checkpointing | measured (KiB/token/layer) | plan | plan / measured |", "|---|---|---|---|---|"]
    torch.manual_seed(0)
    for name in ("2b", "7b"):
        config = load_model_config(str(ROOT / "configs" / f"qwen2_vl_{name}.json"))
        shape = ModelShape.from_config(config)
        for ckpt in (False, True):
            measured = measured_layer_bytes_per_token(config, ckpt)
            planned = 2 * shape.hidden if ckpt else shape.layer_activation_bytes(2, 1)
            lines.append(f"| {name.upper()} | {'on' if ckpt else 'off'} | {measured / 1024:.2f} | "
                         f"{planned / 1024:.2f} | {planned / measured:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results" / "memory_plan.md"
    out.write_text(text)
    print(f"written to {os.path.relpath(out, ROOT)}")


if __name__ == "__main__":
    main()
