"""Varlen attention for packed Qwen2-VL batches, plugged in through transformers' AttentionInterface.

Three backends (and an opt-in fourth) compute the same thing, attention within each packed segment only, a
segment being a sequence or, in the shared-prompt layout, a prompt or one completion that
also sees its group's prompt (r1vl.update.packing.PackedBatch):
  - "flash_attn":  flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16; optional package,
                   flash-attn 2.1 to 2.8: causal masks aligned to the bottom right, GQA native);
  - "varlen_attn": PyTorch's `torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16; torch
                   2.9 and later). Its keywords are read from its signature, not assumed:
                   causal as `is_causal` (2.9, 2.10) or `window_size=(-1, 0)` (2.11 on);
                   `scale` where it exists, else the queries are pre-scaled; `enable_gqa`
                   where it exists (2.13), else the K/V heads are repeated to the query heads;
  - "sdpa":        `scaled_dot_product_attention`, any device and dtype, one call per segment
                   (the boundaries read on the host: one sync per layer on a GPU): its memory
                   is linear in the packed length; the fallback and the reference;
  - "sdpa_masked": one sdpa call with a segment-diagonal (T, T_k) mask: memory quadratic in
                   the packed length (on CUDA the mask with GQA runs only on the math kernel,
                   (heads, T, T_k) fp32 scores per layer), so `use_varlen_attention` refuses it
                   for CUDA models; opt-in on a CPU, where its results differ from the
                   per-segment calls by rounding only (about 1e-7), a perturbation of the
                   numerics for benchmarks/bench_learning.py.
Supported: torch 2.5 and later (varlen_attn from 2.9), flash-attn 2.1 to 2.8.
A shared prompt's keys and values are gathered once per completion that sees them (key_index)
and each completion's segment is one varlen batch entry [prompt keys, own keys] with the
causal mask aligned to the bottom right: one exact kernel call, plain autograd.

`use_varlen_attention(model)` picks one (or takes the one forced), registers it under its own
name and switches the language model and the vision tower to it. A GPU backend is picked only
if it imports and a tiny probe call runs (and agrees with sdpa): a flash-attn wheel built for
another torch is found but not picked. Nothing is monkey-patched.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface

logger = logging.getLogger(__name__)

BACKENDS = ("flash_attn", "varlen_attn", "sdpa", "sdpa_masked")
PORTABLE = ("sdpa", "sdpa_masked")  # any device, any dtype

# No "flash" in the name: transformers >= 5.25 sends every implementation whose name contains
# "flash" to a loader of hub kernels (modeling_utils, lazy_import_flash_attention), which
# fails for a name registered here. The cost: transformers' vision towers hand their per-image
# cu_seqlens only to "flash" implementations (utils.generic.is_flash_attention_requested), so
# under this name they split the patches per image and call the function once per image
# (non-causal, one segment each): the same attention, one launch per image per layer.
_NAME_PREFIX = "r1vl_varlen_"


# --------------------------------------------------------------------------------------------
# The packed attention itself: (T, H, D) layout, like flash_attn_varlen_func
# --------------------------------------------------------------------------------------------


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool,
    scale: float | None = None,
    dropout: float = 0.0,
    backend: str = "sdpa",
    key_index: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
) -> torch.Tensor:
    """Self-attention within each packed segment, optionally over a shared prefix too.

    Args:
        query: (T, Hq, D), all segments' rows concatenated.
        key, value: (T, Hkv, D), Hq a multiple of Hkv (grouped-query attention).
        cu_seqlens: (K+1,) int32, segment boundaries, starting at 0 and ending at T.
        max_seqlen: longest segment, a Python int.
        causal: mask future rows (language model) or not (vision tower).
        scale: softmax scale, default D**-0.5.
        dropout: attention dropout probability (not supported by "varlen_attn").
        backend: one of BACKENDS.
        key_index: None (each segment attends to its own rows), or (T_k,) int64 rows of
            key/value: segment k attends to rows key_index[cu_seqlens_k[k]:cu_seqlens_k[k+1]],
            which end with its own rows (r1vl.update.packing's shared-prompt layout: the group's
            prompt, then the completion itself). The causal mask is then aligned to the
            bottom right, as flash-attn aligns it: the i-th of Lq queries sees the first
            Lk - Lq + i + 1 of its Lk keys.
        cu_seqlens_k: (K+1,) int32 over key_index; required with it.
        max_seqlen_k: longest key range, a Python int; required with key_index.

    Returns:
        (T, Hq, D), same dtype as `query`.
    """
    if key_index is None:
        cu_k, max_k = cu_seqlens, max_seqlen
    else:
        if cu_seqlens_k is None or max_seqlen_k is None:
            raise ValueError("varlen_attention: key_index needs cu_seqlens_k and max_seqlen_k")
        # One gather of the shared rows' keys and values per segment that sees them: the
        # backward sums each prompt key's gradient over its completions (index_select's
        # backward), which is what G unshared copies of the prompt would have received.
        key, value = key.index_select(0, key_index), value.index_select(0, key_index)
        cu_k, max_k = cu_seqlens_k, max_seqlen_k
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        # flash-attn >= 2.1 aligns causal masks to the bottom right when Lq != Lk.
        return flash_attn_varlen_func(
            query, key, value, cu_seqlens, cu_k, max_seqlen, max_k,
            dropout_p=dropout, softmax_scale=scale, causal=causal,
        )
    if backend == "varlen_attn":
        if dropout > 0.0:
            raise ValueError("varlen_attention: backend 'varlen_attn' has no dropout; use 0.0")
        return _call_varlen_attn(query, key, value, cu_seqlens, cu_k, max_seqlen, max_k, causal, scale)
    if backend == "sdpa":
        return _sdpa_per_segment(query, key, value, cu_seqlens, cu_k, causal, scale, dropout)
    if backend == "sdpa_masked":
        return sdpa_masked(query, key, value, cu_seqlens, cu_k, causal, scale, dropout)
    raise ValueError(f"varlen_attention: backend must be one of {BACKENDS}, got {backend!r}")


def _varlen_attn_parameters() -> frozenset:
    """The keyword names of this torch's varlen_attn (ImportError where it has none)."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _call_varlen_attn(query, key, value, cu_q, cu_k, max_q, max_k, causal, scale):
    """torch's varlen_attn with the keywords its signature has (module docstring)."""
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_attn_parameters()
    kwargs = {}
    if query.shape[1] != key.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # one K/V head per query head: memory linear in tokens, like the heads themselves
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    # window (-1, 0) is flash's causal window, aligned to the bottom right like flash-attn's.
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    elif "is_causal" in params:
        kwargs["is_causal"] = causal
    else:
        raise RuntimeError(f"varlen_attn of torch {torch.__version__} takes neither window_size nor is_causal; "
                           "use backend 'flash_attn' or 'sdpa'")
    if scale is not None:
        if "scale" in params:
            kwargs["scale"] = scale
        else:  # its fixed scale is D**-0.5
            query = query * (scale * query.shape[-1] ** 0.5)
    return varlen_attn(query, key, value, cu_q, cu_k, max_q, max_k, **kwargs)


def _sdpa_per_segment(query, key, value, cu_q, cu_k, causal, scale, dropout):
    """One SDPA call per segment, its keys already gathered: memory and work are the sum of
    Lq * Lk over segments, never T^2 (a (T, T) mask costs T^2 however short the segments are;
    measured: half of a tiny model's update with 1024-token micro-batches). The boundaries
    are read on the host: free on a CPU, one sync per layer on a GPU."""
    gqa = query.shape[1] != key.shape[1]
    pieces = []
    for q0, q1, k0, k1 in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        if q1 == q0:
            continue
        q = query[q0:q1].transpose(0, 1)[None]
        k, v = (t[k0:k1].transpose(0, 1)[None] for t in (key, value))
        lq, lk = q1 - q0, k1 - k0
        mask = None
        if causal and lk != lq:  # bottom-right causal: SDPA's is_causal is top-left
            mask = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril(lk - lq)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                             is_causal=causal and mask is None, scale=scale, enable_gqa=gqa)
        pieces.append(out[0].transpose(0, 1))
    return torch.cat(pieces) if pieces else query.new_zeros(query.shape[0], query.shape[1], value.shape[2])


def sdpa_masked(query, key, value, cu_q, cu_k, causal, scale, dropout):
    """One SDPA call over the whole packed batch with a (T, T_k) mask: segment-diagonal,
    causal aligned to each segment's bottom right. O(T * T_k) memory but no host sync: the
    opt-in "sdpa_masked" backend (--attention sdpa_masked, CPU only): a reference for the
    others, and the perturbed numerics of benchmarks/bench_learning.py."""
    def segments(cu, total):
        lengths = (cu[1:] - cu[:-1]).to(torch.int64)
        # output_size keeps repeat_interleave free of a device sync.
        seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths, output_size=total)
        # Rows left to the segment's end, 1 for its last row.
        to_end = cu[1:].to(torch.int64)[seg] - torch.arange(total, device=cu.device)
        return seg, to_end

    seg_q, end_q = segments(cu_q, query.shape[0])
    seg_k, end_k = segments(cu_k, key.shape[0])
    mask = seg_q[:, None] == seg_k[None, :]  # (T, T_k) bool, True = may attend
    if causal:  # bottom-right: a key may be seen by queries no further from the end than it
        mask &= end_k[None, :] >= end_q[:, None]
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None], key.transpose(0, 1)[None], value.transpose(0, 1)[None],
        attn_mask=mask, dropout_p=dropout, scale=scale,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out[0].transpose(0, 1)


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sequence boundaries of a packed row from its text positions, which restart at 0.

    position_ids: (1, T) or (T,) int. Returns cu_seqlens (S+1,) int32 and max_seqlen.
    This is a device sync; `completion_hidden` passes the boundaries instead.
    """
    positions = position_ids.reshape(-1)
    if positions[0] != 0:
        raise ValueError("cu_seqlens_from_positions: the first position must be 0")
    starts = torch.nonzero(positions == 0).flatten()
    end = torch.tensor([positions.numel()], device=positions.device)
    cu = torch.cat([starts, end]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


# --------------------------------------------------------------------------------------------
# The transformers side: the attention-interface function and its mask function
# --------------------------------------------------------------------------------------------


def _interface_function(backend: str):
    """The function transformers calls in every attention layer, bound to `backend`."""

    def attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,  # (1, Hq, T, D)
        key: torch.Tensor,  # (1, Hkv, T, D)
        value: torch.Tensor,  # (1, Hkv, T, D)
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        is_causal: bool | None = None,
        sliding_window: int | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        r1vl_key_index: torch.Tensor | None = None,  # shared-prompt layout (r1vl.update.packing)
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        _check_call(
            type(module).__name__, query, key, attention_mask, sliding_window, cu_seq_lens_q, cu_seq_lens_k,
            r1vl_key_index, max_length_k,
        )
        cu, max_len = _boundaries(query, cu_seq_lens_q, max_length_q, position_ids)
        causal = module.is_causal if is_causal is None else is_causal
        shared = r1vl_key_index is not None
        out = varlen_attention(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
            cu, max_len, causal=causal, scale=scaling, dropout=dropout, backend=backend,
            key_index=r1vl_key_index, cu_seqlens_k=cu_seq_lens_k.to(torch.int32) if shared else None,
            max_seqlen_k=int(max_length_k) if shared else None,
        )
        return out[None], None  # (1, T, Hq, D), no attention weights

    attention_forward.__name__ = f"varlen_attention_{backend}"
    return attention_forward


def _check_call(name, query, key, attention_mask, sliding_window, cu_q, cu_k, key_index, max_k) -> None:
    where = f"r1vl varlen attention ({name})"
    if attention_mask is not None:
        raise ValueError(
            f"{where}: got a padding mask; this attention runs packed batches only "
            "(r1vl.update.packing.pack, attention_mask=None)"
        )
    if query.shape[0] != 1:
        raise ValueError(f"{where}: batch must be 1 packed row, got {query.shape[0]}")
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"{where}: {query.shape[2]} queries against {key.shape[2]} keys; decoding with a "
            "KV cache is not supported, generate with sdpa"
        )
    if sliding_window is not None:
        raise ValueError(f"{where}: sliding-window layers are not supported")
    if key_index is not None:
        if cu_q is None or cu_k is None or max_k is None:
            raise ValueError(f"{where}: r1vl_key_index needs cu_seq_lens_q, cu_seq_lens_k and max_length_k")
    elif cu_k is not None and cu_k is not cu_q and not torch.equal(cu_k, cu_q):
        raise ValueError(f"{where}: cu_seq_lens_k must equal cu_seq_lens_q (self-attention) without r1vl_key_index")


def _boundaries(query, cu_q, max_q, position_ids) -> tuple[torch.Tensor, int]:
    """cu_seqlens and max_seqlen: as passed (completion_hidden, the vision towers), else from
    the restarting text positions (a plain transformers forward), else one sequence."""
    if cu_q is not None:
        cu = cu_q.to(torch.int32)
        return cu, int(max_q) if max_q is not None else int((cu[1:] - cu[:-1]).max())
    if position_ids is not None:
        return cu_seqlens_from_positions(position_ids)
    total = query.shape[2]
    return _one_segment(total, query.device), total


@functools.lru_cache(maxsize=256)
def _one_segment(total: int, device: torch.device) -> torch.Tensor:
    """(2,) int32 [0, total] on `device`, made once per size: transformers calls the attention
    once per image (per window under Qwen2.5-VL) in every vision layer, and a tensor built from
    host values at each call is a blocking host-to-device copy each time. Only read by the
    kernels, never written."""
    return torch.tensor([0, total], dtype=torch.int32, device=device)


def _padding_mask_only(batch_size, q_length, kv_length, *args, attention_mask=None, **kwargs):
    """transformers' mask hook: build no mask, but hand a real padding mask on so that the
    attention function can refuse it (an unregistered name would have it dropped silently)."""
    if attention_mask is not None and attention_mask.ndim == 2 and bool(attention_mask.all()):
        return None
    return attention_mask


def implementation_name(backend: str) -> str:
    """The attention-implementation name a model's sub-configs carry for `backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return _NAME_PREFIX + backend.replace("flash_attn", "fa2")  # no "flash" in it (see _NAME_PREFIX)


def is_varlen_implementation(name: str | None) -> bool:
    """Whether an attention-implementation name is one of r1vl's (any backend)."""
    return bool(name) and name.startswith(_NAME_PREFIX)


def register(backend: str) -> str:
    """Register `backend` with transformers (idempotent); return its implementation name."""
    name = implementation_name(backend)
    AttentionInterface.register(name, _interface_function(backend))
    AttentionMaskInterface.register(name, _padding_mask_only)
    return name


# --------------------------------------------------------------------------------------------
# Choosing and switching
# --------------------------------------------------------------------------------------------


def runs_gpu_kernels(device: torch.device) -> bool:
    """Whether flash_attn / varlen_attn kernels can run on `device`: CUDA only. The one device
    check of those backends; the CPU tests swap it to run stand-ins of the kernels."""
    return device.type == "cuda"


GPU_BACKENDS = ("flash_attn", "varlen_attn")


@functools.lru_cache(maxsize=None)
def probe(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if `backend` imports and a tiny call (two segments, grouped-query heads, causal)
    runs on `device` in `dtype` and agrees with sdpa; else why not. Cached per process."""
    try:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(5, h, 64, generator=gen).to(device, dtype) for h in (4, 2, 2))
        cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
        out = varlen_attention(q, k, v, cu, 3, causal=True, backend=backend)
        expected = _sdpa_per_segment(q.float(), k.float(), v.float(), cu, cu, True, None, 0.0)
        if out.shape != expected.shape or not torch.allclose(out.float(), expected, atol=2e-2, rtol=2e-2):
            return "its probe call disagrees with sdpa"
    except Exception as err:  # an ImportError, or a wheel built for another torch failing at its first call
        return f"{type(err).__name__}: {err}"
    return None


def pick_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The fastest backend that runs on `device` in `dtype`: a GPU backend only if its probe
    call runs; else "sdpa" (per segment, memory linear in tokens)."""
    if runs_gpu_kernels(device) and dtype in (torch.float16, torch.bfloat16):
        for backend in GPU_BACKENDS:
            reason = probe(backend, device, dtype)
            if reason is None:
                return backend
            logger.info("r1vl varlen attention: %s not usable on %s: %s", backend, device, reason)
    return "sdpa"


def check_backend(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"use_varlen_attention: backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "sdpa_masked" and device.type == "cuda":
        raise ValueError(
            "use_varlen_attention: backend 'sdpa_masked' takes memory quadratic in the packed length on CUDA "
            "(a (heads, T, T) fp32 score tensor per layer); use 'flash_attn' (the flash-attn package), "
            "'varlen_attn' (torch >= 2.9) or 'sdpa' (one call per segment)"
        )
    if backend in PORTABLE:
        return
    if not runs_gpu_kernels(device) or dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"use_varlen_attention: backend {backend!r} needs a CUDA model in fp16/bf16, "
            f"the model is on {device} in {dtype}; use 'sdpa'"
        )
    reason = probe(backend, device, dtype)
    if reason is not None:
        raise RuntimeError(f"use_varlen_attention: backend {backend!r} does not run here: {reason}")


def use_varlen_attention(model, backend: str | None = None) -> str:
    """Switch `model`'s language model and vision tower to packed varlen attention.

    Args:
        model: a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model (ForConditionalGeneration or the base model),
            already on its device and in its dtype (they decide the automatic choice).
        backend: None to pick automatically (flash_attn, else varlen_attn on CUDA in
            fp16/bf16, each only if its probe call runs, else sdpa), or one of BACKENDS to
            force it (sdpa_masked is never picked automatically, and refused on CUDA).

    Returns:
        The backend in use; it is also logged. Undo with `model.set_attn_implementation("sdpa")`.
    """
    param = next(model.parameters())
    if backend is None:
        backend = pick_backend(param.device, param.dtype)
    check_backend(backend, param.device, param.dtype)
    name = register(backend)
    model.set_attn_implementation({"text_config": name, "vision_config": name})
    logger.info("r1vl varlen attention: backend %s (model on %s, %s)", backend, param.device, param.dtype)
    return backend


def attention_implementations(model: torch.nn.Module) -> dict[str, str]:
    """The model's attention implementation per sub-config, as set_attn_implementation takes it."""
    return {"text_config": model.config.text_config._attn_implementation,
            "vision_config": model.config.vision_config._attn_implementation}


@contextlib.contextmanager
def sdpa_attention(model: torch.nn.Module):
    """Plain sdpa for the duration, the packed implementation (r1vl.model.attention) restored after:
    for KV-cache decoding, which the packed attention cannot do, and for saving a config
    that must load where r1vl's attention names are not registered."""
    saved = attention_implementations(model)
    model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        model.set_attn_implementation(saved)
