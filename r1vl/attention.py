"""Varlen attention for packed Qwen2-VL batches, plugged in through transformers' AttentionInterface.

Four backends compute the same thing, attention within each packed sequence only:
  - "flash_attn":  flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16; optional package);
  - "varlen_attn": PyTorch's `torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16);
  - "sdpa":        `scaled_dot_product_attention` with a block-diagonal mask, any device and
                   dtype; O(T^2) mask memory, so it is the CPU path and the reference.
  - "sdpa_per_sequence": one unmasked `scaled_dot_product_attention` call per sequence, any
                   device and dtype (opt-in; faster on a CPU, where reading the boundaries on
                   the host costs nothing). Its results differ from "sdpa" by rounding only
                   (about 1e-7), which the built-in run's robustness benchmark uses as a
                   perturbation (benchmarks/bench_learning.py).

`use_varlen_attention(model)` picks one (or takes the one forced), registers it under its own
name and switches the language model and the vision tower to it. Nothing is monkey-patched.
"""
from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface

logger = logging.getLogger(__name__)

BACKENDS = ("flash_attn", "varlen_attn", "sdpa", "sdpa_per_sequence")
PORTABLE = ("sdpa", "sdpa_per_sequence")  # any device, any dtype

# "flash" in the name is load-bearing: transformers' vision towers hand their per-image
# cu_seqlens to the attention function only when the implementation's name contains "flash"
# (utils.generic.is_flash_attention_requested); under any other name they loop over the images
# in Python. The name is set on the sub-configs only, never on the top-level config, whose
# "flash" check would try to load a kernel from the hub.
_NAME_PREFIX = "r1vl_flash_varlen_"


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
) -> torch.Tensor:
    """Self-attention within each packed sequence.

    Args:
        query: (T, Hq, D), all sequences' rows concatenated.
        key, value: (T, Hkv, D), Hq a multiple of Hkv (grouped-query attention).
        cu_seqlens: (S+1,) int32, sequence boundaries, starting at 0 and ending at T.
        max_seqlen: longest sequence, a Python int.
        causal: mask future rows (language model) or not (vision tower).
        scale: softmax scale, default D**-0.5.
        dropout: attention dropout probability (not supported by "varlen_attn").
        backend: one of BACKENDS.

    Returns:
        (T, Hq, D), same dtype as `query`.
    """
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
            dropout_p=dropout, softmax_scale=scale, causal=causal,
        )
    if backend == "varlen_attn":
        from torch.nn.attention.varlen import varlen_attn

        if dropout > 0.0:
            raise ValueError("varlen_attention: backend 'varlen_attn' has no dropout; use 0.0")
        return varlen_attn(
            query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
            scale=scale, window_size=(-1, 0) if causal else (-1, -1),
            enable_gqa=query.shape[1] != key.shape[1],
        )
    if backend == "sdpa":
        return _sdpa_block_diagonal(query, key, value, cu_seqlens, causal, scale, dropout)
    if backend == "sdpa_per_sequence":
        return _sdpa_per_sequence(query, key, value, cu_seqlens, causal, scale, dropout)
    raise ValueError(f"varlen_attention: backend must be one of {BACKENDS}, got {backend!r}")


def _sdpa_block_diagonal(query, key, value, cu_seqlens, causal, scale, dropout):
    total = query.shape[0]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    # output_size keeps repeat_interleave free of a device sync.
    seq_id = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=query.device), lengths, output_size=total
    )
    mask = seq_id[:, None] == seq_id[None, :]  # (T, T) bool, True = may attend
    if causal:
        mask = mask.tril()
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None], key.transpose(0, 1)[None], value.transpose(0, 1)[None],
        attn_mask=mask, dropout_p=dropout, scale=scale,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out[0].transpose(0, 1)


def _sdpa_per_sequence(query, key, value, cu_seqlens, causal, scale, dropout):
    """One unmasked SDPA call per sequence: the work is the sum of the squared lengths
    rather than T^2, at the price of reading the boundaries on the host (a device sync on
    a GPU). A zero-length sequence contributes nothing."""
    gqa = query.shape[1] != key.shape[1]
    bounds = cu_seqlens.tolist()
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        q, k, v = (t[start:end].transpose(0, 1)[None] for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal, scale=scale,
                                             enable_gqa=gqa)
        pieces.append(out[0].transpose(0, 1))
    return torch.cat(pieces) if pieces else query.new_zeros(query.shape[0], query.shape[1], value.shape[2])


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
        max_length_k: int | None = None,  # == max_length_q: self-attention only
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        _check_call(
            type(module).__name__, query, key, attention_mask, sliding_window, cu_seq_lens_q, cu_seq_lens_k
        )
        cu, max_len = _boundaries(query, cu_seq_lens_q, max_length_q, position_ids)
        causal = module.is_causal if is_causal is None else is_causal
        out = varlen_attention(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
            cu, max_len, causal=causal, scale=scaling, dropout=dropout, backend=backend,
        )
        return out[None], None  # (1, T, Hq, D), no attention weights

    attention_forward.__name__ = f"varlen_attention_{backend}"
    return attention_forward


def _check_call(name, query, key, attention_mask, sliding_window, cu_q, cu_k) -> None:
    where = f"r1vl varlen attention ({name})"
    if attention_mask is not None:
        raise ValueError(
            f"{where}: got a padding mask; this attention runs packed batches only "
            "(r1vl.packing.pack, attention_mask=None)"
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
    if cu_k is not None and cu_k is not cu_q and not torch.equal(cu_k, cu_q):
        raise ValueError(f"{where}: cu_seq_lens_k must equal cu_seq_lens_q (self-attention)")


def _boundaries(query, cu_q, max_q, position_ids) -> tuple[torch.Tensor, int]:
    """cu_seqlens and max_seqlen: as passed (completion_hidden, the vision towers), else from
    the restarting text positions (a plain transformers forward), else one sequence."""
    if cu_q is not None:
        cu = cu_q.to(torch.int32)
        return cu, int(max_q) if max_q is not None else int((cu[1:] - cu[:-1]).max())
    if position_ids is not None:
        return cu_seqlens_from_positions(position_ids)
    total = query.shape[2]
    return torch.tensor([0, total], dtype=torch.int32, device=query.device), total


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
    return _NAME_PREFIX + backend


def register(backend: str) -> str:
    """Register `backend` with transformers (idempotent); return its implementation name."""
    name = implementation_name(backend)
    AttentionInterface.register(name, _interface_function(backend))
    AttentionMaskInterface.register(name, _padding_mask_only)
    return name


# --------------------------------------------------------------------------------------------
# Choosing and switching
# --------------------------------------------------------------------------------------------


def pick_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The fastest backend that runs on `device` in `dtype`."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attn"
        if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
            return "varlen_attn"
    return "sdpa"


def _check_backend(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"use_varlen_attention: backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend in PORTABLE:
        return
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"use_varlen_attention: backend {backend!r} needs a CUDA model in fp16/bf16, "
            f"the model is on {device} in {dtype}; use 'sdpa'"
        )
    if backend == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        raise ImportError("use_varlen_attention: backend 'flash_attn' needs the flash-attn package")


def use_varlen_attention(model, backend: str | None = None) -> str:
    """Switch `model`'s language model and vision tower to packed varlen attention.

    Args:
        model: a Qwen2-VL / Qwen2.5-VL model (ForConditionalGeneration or the base model),
            already on its device and in its dtype (they decide the automatic choice).
        backend: None to pick automatically (flash_attn, else varlen_attn on CUDA in
            fp16/bf16, else sdpa), or one of BACKENDS to force it (sdpa_per_sequence is
            never picked automatically).

    Returns:
        The backend in use; it is also logged. Undo with `model.set_attn_implementation("sdpa")`.
    """
    param = next(model.parameters())
    if backend is None:
        backend = pick_backend(param.device, param.dtype)
    _check_backend(backend, param.device, param.dtype)
    name = register(backend)
    model.set_attn_implementation({"text_config": name, "vision_config": name})
    logger.info("r1vl varlen attention: backend %s (model on %s, %s)", backend, param.device, param.dtype)
    return backend
