"""The launches the compile check covers: every kernel at Qwen2-VL's real shapes (N=16384
tokens, V=151936, H=1536 for 2B / 3584 for 7B), each dtype and constexpr variant, packed and
padded layouts. Tensors live on the meta device: nothing is allocated."""
import torch

N, V, S = 16384, 151936, 256
H_2B, H_7B = 1536, 3584
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _t(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def vocab_launches(launches, dtype_name, layout, with_entropy):
    """logprob_fwd, logprob_bwd, logprob_fwd_bwd; padded = (B, L+1, V) logits read through
    the view [:, :-1]."""
    dtype = DTYPES[dtype_name]
    target = _t(N, dtype=torch.int64)
    lse, dlogp, grad = _t(N), _t(N), _t(())
    if layout == "packed":
        logits = _t(N, V, dtype=dtype)
        row_off = tok_of_row = None
        out = logits
    else:
        B, L = 32, 1024                  # B * L = 2N positions, half of them masked
        logits = _t(B, L + 1, V, dtype=dtype)[:, :-1]
        row_off = _t(N, dtype=torch.int64)
        tok_of_row = _t(B * L, dtype=torch.int64)
        out = _t(B * L, V, dtype=dtype)
    calls = launches.run("logits", "logprob_fwd", logits.reshape(-1, V) if layout == "packed" else logits,
                         target, row_off, 0.9, with_entropy)
    calls += launches.run("logits", "logprob_bwd", logits, target, lse, dlogp, grad, row_off, tok_of_row,
                          0.9, out)
    # The one-sweep token-level loss, with old and ref log-probs, KL and delta.
    calls += launches.run("logits", "logprob_fwd_bwd", logits, target, row_off, tok_of_row, _t(N), _t(N),
                          _t(N), _t(N), 0.9, with_entropy, eps_low=0.2, eps_high=0.28, delta=2.0, beta=0.04, out=out)
    return calls


# Epilogue variants (terms.grpo_terms): (seq_level, old, ref, policy, options); options
# are per-token weights ("weight"), the off-policy mask with sampling log-probs ("opsm"), the
# bias-corrected KL ("bias_kl") and vespo's log-weight offset ("offset").
EPILOGUE_VARIANTS = (
    (False, True, True, "clip", ()), (True, True, False, "clip", ()), (False, False, False, "clip", ()),
    (False, True, True, "cispo", ("weight",)), (True, True, True, "sapo", ("opsm", "bias_kl")),
    (False, True, True, "vespo", ("weight", "opsm", "offset")),
)


def grpo_launches(launches, scales=("none", "group", "batch"), terms=len(EPILOGUE_VARIANTS)):
    from r1vl_kernels.options import TermsConfig

    calls = []
    for scale in scales:
        calls += launches.run("terms", "launch_group_advantages", _t(S), 8, scale, 1e-4)
    logp = _t(N)
    for seq_level, with_old, with_ref, policy, options in EPILOGUE_VARIANTS[:terms]:
        cfg = TermsConfig(eps_low=0.2, eps_high=0.2, delta=None if with_ref else 2.0, beta=0.04, inv_norm=1.0 / S,
                          per_seq_mean=True, seq_level=seq_level, policy=policy,
                          off_policy_threshold=0.5 if "opsm" in options else None,
                          bias_correction_kl="bias_kl" in options)
        calls += launches.run("terms", "grpo_terms", logp, _t(N) if with_old else None,
                              _t(N) if with_ref else None, _t(S), _t(S + 1, dtype=torch.int32),
                              _t(N) if "weight" in options else None, _t(N) if "opsm" in options else None,
                              _t(S) if "offset" in options else None, cfg)
    return calls


def hidden_launches(launches, dtype_name, H, with_bias):
    dtype = DTYPES[dtype_name]
    hidden, weight = _t(N, H, dtype=dtype), _t(V, H, dtype=dtype)
    bias = _t(V, dtype=dtype) if with_bias else None
    target = _t(N, dtype=torch.int64)
    # The backward's only kernel is logprob_bwd on logits chunks: the vocabulary launches.
    return launches.run("hidden", "logprob_fwd_from_hidden", hidden, weight, bias, target, 0.9, with_bias)


def all_launches(launches):
    """(variant, [recorded launches]) for every case of the check."""
    for dtype_name in DTYPES:
        yield f"{dtype_name} packed", vocab_launches(launches, dtype_name, "packed", dtype_name != "fp16")
        yield f"{dtype_name} padded", vocab_launches(launches, dtype_name, "padded", dtype_name == "fp16")
    yield "fp32", grpo_launches(launches)
    yield "bf16 H=1536 bias+entropy", hidden_launches(launches, "bf16", H_2B, True)
    yield "bf16 H=3584", hidden_launches(launches, "bf16", H_7B, False)
    yield "fp16 H=1536", hidden_launches(launches, "fp16", H_2B, False)
    yield "fp32 H=1536 bias+entropy", hidden_launches(launches, "fp32", H_2B, True)


# Registers of the O(N) epilogue kernels (terms.py: one program per group or sequence,
# 4 warps; they use 12-40).
EPILOGUE_REGISTER_BUDGET = 64


def record(launches, case: str):
    """The launches of one named case: "vocab DTYPE LAYOUT", "vocab DTYPE LAYOUT maxnreg=R"
    (registers capped so that it spills: the check must see it), "epilogue" (every
    variant of EPILOGUE_VARIANTS), "hidden DTYPE H=.. [bias+entropy]", or "hidden fp32 H=..
    64x128x64" (the fp32 tiles before the fix, which spill; 15-20 s to compile)."""
    kind, *rest = case.split(" ")
    if kind == "vocab":
        dtype, layout, *cap = rest
        calls = vocab_launches(launches, dtype, layout, with_entropy=layout == "packed")
        if cap:
            for _fn, _grid, _args, kwargs in calls:
                kwargs["maxnreg"] = int(cap[0].split("=")[1])
        return calls
    if kind == "epilogue":
        return grpo_launches(launches, scales=("batch",))
    dtype, h, *variant = rest
    H = int(h.split("=")[1])
    if variant == ["64x128x64"]:
        module = launches.modules["hidden"]
        saved = dict(module.FWD_CONFIGS)
        module.FWD_CONFIGS[("fp32", 9)] = module.FWD_CONFIGS[("fp32", 8)] = ((64, 128, 64, 4, 3, None), 128)
        try:
            return hidden_launches(launches, dtype, H, with_bias=False)
        finally:
            module.FWD_CONFIGS.update(saved)
    return hidden_launches(launches, dtype, H, with_bias=variant == ["bias+entropy"])


def register_budget(launches, res, capability: int) -> int:
    """The register budget the launcher states for a compiled launch."""
    if res.kernel.startswith("_logprob"):
        return launches.modules["logits"].REGISTER_BUDGET
    if res.kernel == "_hidden_fwd_kernel":
        kind = "fp32" if "fp32" in res.variant.split(" ") else "half"
        return launches.modules["hidden"].FWD_CONFIGS[(kind, capability // 10)][1]
    return EPILOGUE_REGISTER_BUDGET
