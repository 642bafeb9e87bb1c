"""GRPO loss from logits: r1vl's fused kernel against eager PyTorch (as TRL computes it), the
same under torch.compile, and Liger-Kernel's triton_grpo_loss.

    python benchmarks/bench_grpo_loss.py            # GPU: N in {4096, 16384, 65536}, V in {32000, 151936}, bf16
    python benchmarks/bench_grpo_loss.py --quick    # a smaller sweep

For each provider and shape: forward, backward and forward + backward times (median ms),
the bandwidth that time implies for the bytes the loss must move (forward reads the logits;
forward + backward read them once and write the gradient: the two-pass floor), that
bandwidth as a share of a device-to-device copy measured in the same run (for fwd+bwd: the
share of the floor reached; target 1 / 1.15 = 0.87), and the peak memory a forward +
backward adds on top of the logits. "r1vl" is the token-level loss in one sweep (dlogits
written in forward, backward a hand-over); "r1vl_inplace" and "r1vl_sequence" take the
two-sweep path (read in forward, read + write in backward). Rows are appended to benchmarks/results/grpo_loss.csv with the device name, library
versions and git commit, and a table is printed last. Without a GPU it runs the CPU paths at
small sizes and says so in every row (device "cpu").
"""
import os
import sys

import torch
import torch._functorch.config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_csv, parse_args, copy_bandwidth, environment, print_table, time_modes  # noqa: E402
from trl_eager import trl_grpo_loss  # noqa: E402

from r1vl_kernels import grpo_loss  # noqa: E402

SEQ_LEN = 1024  # tokens per sequence in the padded layouts of the baselines


# ----------------------------------------------------------------------------- providers


def make_inputs(N, V, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    B = N // SEQ_LEN
    logits = torch.randn(B, SEQ_LEN + 1, V, device=device, dtype=dtype, generator=g)  # +1: Liger's layout
    target = torch.randint(0, V, (B, SEQ_LEN), device=device, generator=g)
    old = -torch.rand(B, SEQ_LEN, device=device, generator=g) * 10
    ref = old + 0.1 * torch.randn(B, SEQ_LEN, device=device, generator=g)
    adv = torch.randn(B, device=device, generator=g)
    mask = torch.ones(B, SEQ_LEN, device=device)
    cu = torch.arange(0, N + 1, SEQ_LEN, device=device, dtype=torch.int32)
    return dict(logits=logits, target=target, old=old, ref=ref, adv=adv, mask=mask, cu=cu, B=B)


def padded_leaf(x):
    return x["logits"].detach().clone().requires_grad_()  # (B, L+1, V): TRL's and Liger's input


def packed_leaf(x):
    B, L1, V = x["logits"].shape
    return x["logits"][:, :-1].reshape(B * (L1 - 1), V).clone().requires_grad_()  # (N, V) packed


def providers(device, have_liger):
    """name -> (make_leaf(x), build(x, leaf) -> callable returning the loss, backward alone
    timeable). In-place backward variants overwrite their logits, so only fwd+bwd is timed."""
    def trl(fn):
        return lambda x, leaf: lambda: fn(leaf[:, :-1], x["target"], x["mask"], x["adv"], x["old"], x["ref"])

    def ours_packed(inplace, impl, level="token"):
        return lambda x, leaf: lambda: grpo_loss(
            leaf, x["target"].reshape(-1), x["cu"], x["adv"], x["old"].reshape(-1), x["ref"].reshape(-1),
            beta=0.04, inplace_backward=inplace, importance_sampling_level=level, impl=impl).loss

    def ours_padded(x, leaf):  # reads the strided leaf[:, :-1] view in place
        return lambda: grpo_loss(leaf[:, :-1], x["target"], advantages=x["adv"], old_logp=x["old"],
                                 ref_logp=x["ref"], completion_mask=x["mask"], beta=0.04).loss

    # Backward alone is timed by re-running one graph's backward (retain_graph=True), which
    # compiled graphs with donated buffers refuse.
    torch._functorch.config.donated_buffer = False
    table = {
        "torch_eager": (padded_leaf, trl(trl_grpo_loss), True),
        "torch_compile": (padded_leaf, trl(torch.compile(trl_grpo_loss, dynamic=False)), True),
    }
    if device == "cuda":
        table["r1vl"] = (packed_leaf, ours_packed(False, "triton"), True)
        table["r1vl_inplace"] = (packed_leaf, ours_packed(True, "triton"), False)
        table["r1vl_sequence"] = (packed_leaf, ours_packed(False, "triton", "sequence"), True)
        table["r1vl_padded"] = (padded_leaf, ours_padded, True)
    else:
        table["r1vl_torch"] = (packed_leaf, ours_packed(False, "torch"), True)
    if have_liger and device == "cuda":
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        def liger(inplace):
            return lambda x, leaf: lambda: triton_grpo_loss(
                leaf, x["old"], x["ref"], x["target"], x["adv"], x["mask"], temperature=1.0, beta=0.04,
                eps_low=0.2, eps_high=0.2, inplace=inplace, loss_type="grpo", reduce=True)[0]
        table["liger"] = (padded_leaf, liger(False), True)
        table["liger_inplace"] = (padded_leaf, liger(True), False)
    return table


def run_one(make_leaf, build, supports_bwd, x, device):
    leaf = make_leaf(x)
    restore = None
    if not supports_bwd:  # in-place backward: put the logits back after each backward
        pristine = leaf.detach().clone()
        restore = lambda: leaf.data.copy_(pristine)  # noqa: E731
    return time_modes([leaf], build(x, leaf), device, restore)


# ----------------------------------------------------------------------------- main


def main():
    args = parse_args(__doc__)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        sizes = [(4096, 32000), (4096, 151936), (16384, 32000), (16384, 151936), (65536, 32000), (65536, 151936)]
        if args.quick:
            sizes = [(4096, 151936), (16384, 151936)]
        dtype = torch.bfloat16
    else:
        print("No GPU: timing the CPU paths (eager torch) at small sizes; the Triton kernels need a GPU.")
        sizes = [(1024, 4096), (2048, 32000)] if not args.quick else [(1024, 4096)]
        dtype = torch.bfloat16
    env = environment()
    ceiling = copy_bandwidth(device)
    print(f"device: {env['device']}; copy bandwidth {ceiling / 1e9:.0f} GB/s (read + write)")

    rows = []
    for N, V in sizes:
        x = make_inputs(N, V, dtype, device)
        logits_bytes = N * V * x["logits"].element_size()
        moved = {"fwd": logits_bytes, "bwd": 2 * logits_bytes, "fwd+bwd": 2 * logits_bytes}
        for name, (make_leaf, build, supports_bwd) in providers(device, bool(env["liger"])).items():
            note = ""
            try:
                times, peak = run_one(make_leaf, build, supports_bwd, x, device)
            except torch.cuda.OutOfMemoryError:
                times, peak, note = {}, float("nan"), "out of memory"
                torch.cuda.empty_cache()
            for mode in ("fwd", "bwd", "fwd+bwd"):
                ms = times.get(mode, float("nan"))
                gbs = moved[mode] / (ms * 1e-3) / 1e9
                rows.append(dict(env, provider=name, N=N, V=V, dtype=str(dtype).replace("torch.", ""), mode=mode,
                                 ms=f"{ms:.3f}", GB_s=f"{gbs:.0f}", of_copy_bw=f"{gbs * 1e9 / ceiling:.2f}",
                                 peak_extra_MB=f"{peak / 2**20:.0f}",
                                 note=note or ("" if mode in times else "n/a: in-place backward")))
        del x
        if device == "cuda":
            torch.cuda.empty_cache()
        floor_ms = 2 * logits_bytes / ceiling * 1e3
        print(f"N={N} V={V}: two-pass floor for fwd+bwd (read once, write once at copy bandwidth) {floor_ms:.2f} ms")

    if not args.no_save:
        print(f"appended {len(rows)} rows to {os.path.relpath(append_csv('grpo_loss.csv', rows))}")
    print_table(rows, ["provider", "N", "V", "mode", "ms", "GB_s", "of_copy_bw", "peak_extra_MB", "note"])

if __name__ == "__main__":
    main()
