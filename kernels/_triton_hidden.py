"""Triton kernels for the log-probs and the GRPO loss gradient straight from hidden states:
the lm_head matmul fused in, the (N, V) logits never written to memory.

Forward, one pass over the vocabulary: each program takes BLOCK_N tokens and one slice of
the vocabulary, computes logit tiles hidden @ weight^T on chip (tl.dot, fp32 accumulation),
and carries an online logsumexp (and the entropy's sum) over its slice; the target logit is
picked up on the way. The slices' partial sums are merged per token afterwards (O(N) work).
Splitting the vocabulary keeps the GPU busy when N is small.

Backward, one more pass: each program recomputes one (BLOCK_N, BLOCK_V) logit tile, forms
dlogits = coef_t * (onehot - softmax) with the per-token coef_t = dLoss/dlogp_t * grad / T
applied before any reduction over tokens (Liger #1298), and accumulates
dhidden += dlogits @ weight and dweight += dlogits^T @ hidden (dbias += sum over tokens)
with fp32 atomic adds. Memory: O(N) fp32 per-token buffers, fp32 accumulators for dhidden
(N, H) and dweight (V, H), which are then cast to the inputs' dtype. Tiles whose tokens all
have coef 0 (zero advantage, no KL) are skipped. Exact: no tile is skipped on its values.

Passes: every variant (token or sequence importance sampling, any loss type) makes one
forward and one backward pass over hidden x weight (2NHV + 6NHV flops): the sequence-level
ratio needs only the per-token log-probs, which the forward pass provides.

Interpreter (TRITON_INTERPRET=1): bf16 arithmetic is broken there, so UPCAST loads tiles as
fp32 before tl.dot; on a GPU half-precision tiles go to the tensor cores as they are.
"""
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = tl.constexpr(LOG2E)

# Tile sizes; tests lower them so that small shapes still cross several tiles.
BLOCK_N, BLOCK_V, BLOCK_H = 64, 128, 64
TARGET_PROGRAMS = 264  # about two programs per SM on an H100/H200


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _logit_tile(hidden_ptr, stride_h, weight_ptr, stride_w, bias_ptr, rows, row_mask, cols, col_mask,
                H, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 logits hidden[rows] @ weight[cols]^T (+ bias[cols])."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    ks = tl.arange(0, BLOCK_H)
    for k0 in range(0, H, BLOCK_H):
        k_mask = k0 + ks < H
        h = tl.load(hidden_ptr + rows[:, None] * stride_h + (k0 + ks)[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(weight_ptr + cols[None, :] * stride_w + (k0 + ks)[:, None],
                    mask=col_mask[None, :] & k_mask[:, None], other=0.0)  # (BLOCK_H, BLOCK_V)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _hidden_fwd_kernel(
    hidden_ptr, stride_h,       # (N, H)
    weight_ptr, stride_w,       # (V, H)
    bias_ptr,                   # (V,) if HAS_BIAS
    target_ptr,                 # (N,) int64
    part_ptr,                   # (4, SPLITS, N) fp32 out: max, sum, entropy sum, target (base 2)
    N, V, H, v_per_split, scale,  # scale = log2(e) / T
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    target = tl.load(target_ptr + rows, mask=row_mask, other=-1)
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)

    # Online logsumexp per token over this vocabulary slice, as in _triton_vocab.
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    w = tl.zeros((BLOCK_N,), tl.float32)
    y_target = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < v_end
        acc = _logit_tile(hidden_ptr, stride_h, weight_ptr, stride_w, bias_ptr, rows, row_mask, cols, col_mask,
                          H, HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        y = tl.where(col_mask[None, :], acc * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(y, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        e = tl.exp2(y - m_safe[:, None])
        s = s * alpha + tl.sum(e, axis=1)
        if WITH_ENTROPY:
            w = w * alpha + tl.sum(e * tl.where(e > 0.0, y, 0.0), axis=1)
        y_target += tl.sum(tl.where(cols[None, :] == target[:, None], y, 0.0), axis=1)
        m = m_new

    base = part_ptr + split * N + rows
    stride_part = n_splits * N
    tl.store(base, m, mask=row_mask)
    tl.store(base + stride_part, s, mask=row_mask)
    tl.store(base + 2 * stride_part, w, mask=row_mask)
    tl.store(base + 3 * stride_part, y_target, mask=row_mask)


@triton.jit
def _hidden_bwd_kernel(
    hidden_ptr, stride_h, weight_ptr, stride_w, bias_ptr,
    target_ptr, lse_ptr, dlogp_ptr,   # (N,) int64, fp32, fp32
    grad_out_ptr,                     # () fp32
    dhidden_ptr, dweight_ptr, dbias_ptr,  # fp32 accumulators (N, H), (V, H), (V,), contiguous
    N, V, H, scale, inv_temperature,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_mask = cols < V
    # The per-token upstream factor, applied to every dlogits element before the reductions.
    coef = tl.load(dlogp_ptr + rows, mask=row_mask, other=0.0) * tl.load(grad_out_ptr) * inv_temperature
    if tl.max(tl.abs(coef), axis=0) > 0.0:
        acc = _logit_tile(hidden_ptr, stride_h, weight_ptr, stride_w, bias_ptr, rows, row_mask, cols, col_mask,
                          H, HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        lse2 = tl.load(lse_ptr + rows, mask=row_mask, other=0.0) * _LOG2E
        p = tl.exp2(acc * scale - lse2[:, None])
        target = tl.load(target_ptr + rows, mask=row_mask, other=-1)
        d = coef[:, None] * (tl.where(cols[None, :] == target[:, None], 1.0, 0.0) - p)
        d = tl.where(row_mask[:, None] & col_mask[None, :], d, 0.0)
        if HAS_BIAS:
            tl.atomic_add(dbias_ptr + cols, tl.sum(d, axis=0), mask=col_mask)
        if not UPCAST:
            d = d.to(hidden_ptr.dtype.element_ty)  # half-precision operands for the tensor cores
        ks = tl.arange(0, BLOCK_H)
        for k0 in range(0, H, BLOCK_H):
            k_mask = k0 + ks < H
            w = tl.load(weight_ptr + cols[:, None] * stride_w + (k0 + ks)[None, :],
                        mask=col_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_V, BLOCK_H)
            h = tl.load(hidden_ptr + rows[:, None] * stride_h + (k0 + ks)[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_H)
            if UPCAST:
                w = w.to(tl.float32)
                h = h.to(tl.float32)
            dh = tl.dot(d, w, input_precision=DOT_PRECISION)                  # (BLOCK_N, BLOCK_H)
            tl.atomic_add(dhidden_ptr + rows[:, None] * H + (k0 + ks)[None, :], dh,
                          mask=row_mask[:, None] & k_mask[None, :])
            dw = tl.dot(tl.trans(d), h, input_precision=DOT_PRECISION)        # (BLOCK_V, BLOCK_H)
            tl.atomic_add(dweight_ptr + cols[:, None] * H + (k0 + ks)[None, :], dw,
                          mask=col_mask[:, None] & k_mask[None, :])


# ----------------------------------------------------------------------------- launchers


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _dot_settings(dtype):
    upcast = _interpreting() or dtype == torch.float32
    # fp32 inputs: exact fp32 products, not TF32, so the result matches the eager path.
    return upcast, "ieee" if dtype == torch.float32 or _interpreting() else "tf32"


def logprob_fwd(hidden, weight, bias, target_ids, temperature: float, with_entropy: bool):
    """hidden (N, H), weight (V, H), bias (V,) or None, unit stride along H; target_ids (N,)
    int64. Returns logp, lse, entropy: (N,) fp32 (entropy empty unless with_entropy)."""
    N, H = hidden.shape
    V = weight.shape[0]
    blocks_n = triton.cdiv(N, BLOCK_N)
    splits = max(1, min(triton.cdiv(V, BLOCK_V), triton.cdiv(TARGET_PROGRAMS, max(blocks_n, 1))))
    v_per_split = triton.cdiv(triton.cdiv(V, splits), BLOCK_V) * BLOCK_V
    splits = triton.cdiv(V, v_per_split)
    part = torch.empty(4, splits, N, dtype=torch.float32, device=hidden.device)
    upcast, precision = _dot_settings(hidden.dtype)
    if N > 0:
        _hidden_fwd_kernel[(blocks_n, splits)](
            hidden, hidden.stride(0), weight, weight.stride(0), bias if bias is not None else weight,
            target_ids, part, N, V, H, v_per_split, LOG2E / temperature,
            HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, UPCAST=upcast, DOT_PRECISION=precision,
            BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_H=BLOCK_H, num_warps=8 if not upcast else 4,
        )
    return merge_splits(part, with_entropy)


def merge_splits(part, with_entropy: bool):
    """Merge per-slice (max, sum, entropy sum, target), base 2, into per-token fp32 logp,
    lse and entropy. part: (4, SPLITS, N) fp32."""
    m, s, w, y_target = part
    m_max = m.max(dim=0).values
    m_safe = torch.where(torch.isinf(m_max), torch.zeros_like(m_max), m_max)
    rescale = torch.exp2(m - m_safe)
    total = (s * rescale).sum(0)
    lse2 = m_safe + torch.log2(total)
    logp = (y_target.sum(0) - lse2) * 0.6931471805599453
    entropy = ((lse2 - (w * rescale).sum(0) / total) * 0.6931471805599453) if with_entropy else logp.new_empty(0)
    return logp, lse2 * 0.6931471805599453, entropy


def grad_from_hidden(hidden, weight, bias, target_ids, lse, dlogp, grad_out, temperature: float):
    """(dhidden (N, H), dweight (V, H), dbias (V,) or None), fp32 accumulators."""
    N, H = hidden.shape
    V = weight.shape[0]
    dhidden = torch.zeros(N, H, dtype=torch.float32, device=hidden.device)
    dweight = torch.zeros(V, H, dtype=torch.float32, device=hidden.device)
    dbias = torch.zeros(V, dtype=torch.float32, device=hidden.device) if bias is not None else None
    upcast, precision = _dot_settings(hidden.dtype)
    if N > 0:
        _hidden_bwd_kernel[(triton.cdiv(N, BLOCK_N), triton.cdiv(V, BLOCK_V))](
            hidden, hidden.stride(0), weight, weight.stride(0), bias if bias is not None else weight,
            target_ids, lse, dlogp, grad_out.to(torch.float32), dhidden, dweight,
            dbias if dbias is not None else dweight, N, V, H, LOG2E / temperature, 1.0 / temperature,
            HAS_BIAS=bias is not None, UPCAST=upcast, DOT_PRECISION=precision,
            BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_H=BLOCK_H, num_warps=8 if not upcast else 4,
        )
    return dhidden, dweight, dbias
