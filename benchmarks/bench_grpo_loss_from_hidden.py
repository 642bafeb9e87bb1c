"""GRPO loss from hidden states (lm_head fused): r1vl's grpo_loss_from_hidden against the
lm_head matmul followed by the loss in eager PyTorch (as TRL computes it), the same under
torch.compile, lm_head + r1vl's grpo_loss (logits materialized once), and Liger-Kernel's
LigerFusedLinearGRPOLoss (chunked torch).

    python benchmarks/bench_grpo_loss_from_hidden.py          # GPU: N in {4096, 16384}, Qwen2-VL 2B and 7B heads, bf16
    python benchmarks/bench_grpo_loss_from_hidden.py --quick

Per provider and shape: forward, backward and forward + backward (median ms), the TFLOP/s
that time implies for the matmul work (forward 2NHV, backward with recomputed logits 6NHV
more: 8NHV in all), as a share of a plain bf16 matmul measured in the same run (target for
r1vl_fused fwd+bwd: 0.75), and the peak memory a forward + backward adds on top of its
inputs (target: at most 1.5 GB at N=16384, H=3584; r1vl_fused's backward holds one logits
chunk of at most 512 MiB besides the gradients, its forward none). Appended to
benchmarks/results/grpo_loss_from_hidden.csv; a table is printed last. Without a GPU it
times the CPU paths at small sizes and says so.
"""
import os
import sys

import torch
import torch._functorch.config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_csv, parse_args, environment, matmul_flops, print_table, time_modes  # noqa: E402
from trl_eager import trl_grpo_loss  # noqa: E402

from r1vl_kernels import grpo_loss, grpo_loss_from_hidden  # noqa: E402

SEQ_LEN = 1024
NOTES = {("liger_fused_linear", "bwd"): "gradients are computed in its forward"}


def make_inputs(N, H, V, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    B = N // SEQ_LEN
    return dict(
        hidden=torch.randn(B, SEQ_LEN, H, device=device, dtype=dtype, generator=g),
        weight=(torch.randn(V, H, device=device, generator=g) * H**-0.5).to(dtype),
        target=torch.randint(0, V, (B, SEQ_LEN), device=device, generator=g),
        old=-torch.rand(B, SEQ_LEN, device=device, generator=g) * 10,
        adv=torch.randn(B, device=device, generator=g),
        mask=torch.ones(B, SEQ_LEN, device=device),
        cu=torch.arange(0, N + 1, SEQ_LEN, device=device, dtype=torch.int32),
    )


def providers(device, have_liger):
    """name -> build(x, hidden_leaf, weight_leaf) -> callable returning the loss."""
    def eager(loss_fn):
        return lambda x, h, w: lambda: loss_fn(h @ w.t(), x["target"], x["mask"], x["adv"], x["old"], x["old"])

    impl = "triton" if device == "cuda" else "torch"

    def fused(x, h, w):
        return lambda: grpo_loss_from_hidden(h.flatten(0, 1), w, x["target"].reshape(-1), x["cu"], x["adv"],
                                             x["old"].reshape(-1), x["old"].reshape(-1), beta=0.04, impl=impl).loss

    def lm_head_then_ours(x, h, w):
        return lambda: grpo_loss(h.flatten(0, 1) @ w.t(), x["target"].reshape(-1), x["cu"], x["adv"],
                                 x["old"].reshape(-1), x["old"].reshape(-1), beta=0.04, impl=impl).loss

    torch._functorch.config.donated_buffer = False  # backward alone re-runs one graph's backward
    table = {"torch_eager": eager(trl_grpo_loss),
             "torch_compile": eager(torch.compile(trl_grpo_loss, dynamic=False)),
             "r1vl_lm_head+grpo_loss": lm_head_then_ours, "r1vl_fused": fused}
    if have_liger:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        liger_loss = LigerFusedLinearGRPOLoss(beta=0.04, compiled=device == "cuda", loss_type="grpo")
        table["liger_fused_linear"] = lambda x, h, w: lambda: liger_loss(
            h, w, x["target"], x["mask"], x["adv"], ref_per_token_logps=x["old"], old_per_token_logps=x["old"])[0]
    return table


def main():
    args = parse_args(__doc__)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        sizes = [(4096, 1536, 151936), (16384, 1536, 151936), (4096, 3584, 152064), (16384, 3584, 152064)]
        sizes = sizes[:2] if args.quick else sizes
    else:
        print("No GPU: timing the CPU paths (eager torch) at small sizes; the Triton kernels need a GPU.")
        sizes = [(1024, 256, 8192)]
    dtype = torch.bfloat16
    env = environment()
    ceiling = matmul_flops(device, dtype)
    print(f"device: {env['device']}; plain bf16 matmul {ceiling / 1e12:.0f} TFLOP/s")

    rows = []
    for N, H, V in sizes:
        x = make_inputs(N, H, V, dtype, device)
        flops = {"fwd": 2 * N * H * V, "bwd": 6 * N * H * V, "fwd+bwd": 8 * N * H * V}
        for name, build in providers(device, bool(env["liger"])).items():
            h = x["hidden"].clone().requires_grad_()
            w = x["weight"].clone().requires_grad_()
            note = ""
            try:
                times, peak = time_modes([h, w], build(x, h, w), device)
            except torch.cuda.OutOfMemoryError:
                times, peak, note = {}, float("nan"), "out of memory"
            del h, w
            if device == "cuda":
                torch.cuda.empty_cache()
            for mode in ("fwd", "bwd", "fwd+bwd"):
                ms = times.get(mode, float("nan"))
                tflops = flops[mode] / (ms * 1e-3) / 1e12
                rows.append(dict(env, provider=name, N=N, H=H, V=V, dtype="bfloat16", mode=mode, ms=f"{ms:.3f}",
                                 TFLOP_s=f"{tflops:.2f}", of_matmul=f"{tflops * 1e12 / ceiling:.2f}",
                                 peak_extra_MB=f"{peak / 2**20:.0f}",
                                 note=note or NOTES.get((name, mode), "")))
        print(f"N={N} H={H} V={V}: matmul floor for fwd+bwd {flops['fwd+bwd'] / ceiling * 1e3:.1f} ms")

    if not args.no_save:
        print(f"appended {len(rows)} rows to {os.path.relpath(append_csv('grpo_loss_from_hidden.csv', rows))}")
    print_table(rows, ["provider", "N", "H", "V", "mode", "ms", "TFLOP_s", "of_matmul", "peak_extra_MB", "note"])


if __name__ == "__main__":
    main()
