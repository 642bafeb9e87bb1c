"""Triton kernels that sweep the vocabulary: per-token log-probs forward, dlogits backward.

Both kernels run one program per row, tokens on grid axis 0 (2**31 - 1 programs, so a
million tokens are fine; grid axes 1 and 2 stop at 65,535, Liger #1294). A row's offset is
computed in int64: N * V passes 2**31 at N = 16384, V = 151936.

Arithmetic is fp32 whatever the logits dtype (the Triton interpreter cannot do bf16
arithmetic, and the logsumexp needs fp32 anyway). Exponentials are base 2 on pre-scaled
values: y = x * log2(e) / T, so softmax(x / T) = 2**(y - max y) / sum 2**(y - max y) costs
one multiply and one ex2 per element.
"""
import math

import torch
import triton
import triton.language as tl

from ._env import LN2, LOG2E
from ._triton_token import token_dlogp

_LN2 = tl.constexpr(LN2)
_LOG2E = tl.constexpr(LOG2E)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _row_logsumexp(row_ptr, V, scale, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """One sweep over a row of V logits: (lse2, entropy2), the logsumexp of y = x * scale
    and, if WITH_ENTROPY, lse2 - E_p[y], both in base 2 (multiply by ln 2 for nats)."""
    # Online logsumexp over vocabulary blocks, in base 2. m starts at -inf (never 0:
    # verl #7439); while every logit so far is -inf (a masked vocabulary), m_safe = 0 keeps
    # the sums at 0 instead of nan from -inf - -inf.
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    w = tl.zeros((), tl.float32)  # sum 2**(y - m) * y, for the entropy
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        x = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.where(mask, x * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(y, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        e = tl.exp2(y - m_safe)
        s = s * alpha + tl.sum(e, axis=0)
        if WITH_ENTROPY:
            w = w * alpha + tl.sum(e * tl.where(e > 0.0, y, 0.0), axis=0)
        m = m_new
    lse2 = m + tl.log2(s)
    # H = lse - E_p[z] with z = x / T; both terms carried in base 2.
    return lse2, lse2 - w / s


@triton.jit
def _write_dlogits(src, dst, V, scale, lse2, coef, target, BLOCK_V: tl.constexpr):
    """dst[:V] = coef * (onehot(target) - softmax), softmax = 2**(src * scale - lse2);
    coef == 0 (padding rows, zero advantage without KL) writes zeros without reading src."""
    cols = tl.arange(0, BLOCK_V)
    if coef == 0.0:
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            tl.store(dst + start + cols, tl.zeros((BLOCK_V,), tl.float32).to(dst.dtype.element_ty), mask=mask)
    else:
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x = tl.load(src + start + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp2(x * scale - lse2)
            d = coef * (tl.where(start + cols == target, 1.0, 0.0) - p)
            tl.store(dst + start + cols, d.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _output_row_source(row, logits_ptr, stride_row, row_off_ptr, tok_of_row_ptr, INDIRECT: tl.constexpr,
                       ROW_ALIGN: tl.constexpr):
    """(tok, has_tok, src) of an output row of dlogits. Direct: row r is token r, read at
    r * stride_row. Indirect (padded layouts): row r holds token tok_of_row[r] (or nothing,
    -1: a zero row; tok is then 0 so that loads stay in bounds), read at row_off[tok]."""
    if INDIRECT:
        tok = tl.load(tok_of_row_ptr + row)
    else:
        tok = row
    has_tok = tok >= 0
    tok = tl.maximum(tok, 0)
    if INDIRECT:
        # The hint lets the compiler issue 16-byte vector loads from a row it cannot see.
        src = logits_ptr + tl.multiple_of(tl.load(row_off_ptr + tok), ROW_ALIGN)
    else:
        src = logits_ptr + tok * stride_row
    return tok, has_tok, src


@triton.jit
def _logprob_fwd_kernel(
    logits_ptr, stride_row,     # rows of V logits, any float dtype, unit stride along V
    target_ptr,                 # (N,) int64
    row_off_ptr,                # (N,) int64 element offset of each token's row, if HAS_ROW_OFF
    logp_ptr, lse_ptr,          # (N,) fp32 out: log p(target), logsumexp(logits / T)
    entropy_ptr,                # (N,) fp32 out, written if WITH_ENTROPY
    V, scale,                   # scale = log2(e) / T
    HAS_ROW_OFF: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    ROW_ALIGN: tl.constexpr,    # every row offset is a multiple of it (elements), if HAS_ROW_OFF
    BLOCK_V: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    if HAS_ROW_OFF:
        # The hint lets the compiler issue 16-byte vector loads from a row it cannot see.
        row_ptr = logits_ptr + tl.multiple_of(tl.load(row_off_ptr + tok), ROW_ALIGN)
    else:
        row_ptr = logits_ptr + tok * stride_row
    lse2, entropy2 = _row_logsumexp(row_ptr, V, scale, WITH_ENTROPY, BLOCK_V)
    target = tl.load(target_ptr + tok)
    y_target = tl.load(row_ptr + target).to(tl.float32) * scale
    tl.store(logp_ptr + tok, (y_target - lse2) * _LN2)
    tl.store(lse_ptr + tok, lse2 * _LN2)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + tok, entropy2 * _LN2)


@triton.jit
def _logprob_fwd_bwd_kernel(
    logits_ptr, stride_row,     # as in _logprob_fwd_kernel
    dlogits_ptr, stride_drow,   # (R, V) out, logits dtype
    target_ptr,                 # (N,) int64
    row_off_ptr, tok_of_row_ptr,  # as in _logprob_bwd_kernel, if INDIRECT
    old_ptr, ref_ptr,           # (N,) fp32, read if HAS_OLD / USE_KL
    adv_ptr, weight_ptr,        # (N,) fp32: each token's advantage and weight in the loss
    logp_ptr, lse_ptr, entropy_ptr, dlogp_ptr,  # (N,) fp32 out (entropy if WITH_ENTROPY)
    V, scale, inv_temperature, eps_low, eps_high, delta, beta,
    INDIRECT: tl.constexpr, ROW_ALIGN: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    HAS_OLD: tl.constexpr, USE_KL: tl.constexpr, HAS_DELTA: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Forward and backward of the token-level loss in one program per output row: sweep 1
    reads the row for its logsumexp; the token's dLoss/dlogp follows at once (token_dlogp);
    sweep 2 reads the row again, while it is still in L2, and writes
    dlogits = dlogp / T * (onehot(target) - softmax(logits / T)) for an upstream gradient
    of 1. Rows are as in _logprob_bwd_kernel (direct, or INDIRECT with -1 for a zero row)."""
    row = tl.program_id(0).to(tl.int64)
    tok, has_tok, src = _output_row_source(row, logits_ptr, stride_row, row_off_ptr, tok_of_row_ptr, INDIRECT,
                                           ROW_ALIGN)
    dst = dlogits_ptr + row * stride_drow
    coef = tl.zeros((), tl.float32)
    lse2 = tl.zeros((), tl.float32)
    target = tl.load(target_ptr + tok)
    if has_tok:
        lse2, entropy2 = _row_logsumexp(src, V, scale, WITH_ENTROPY, BLOCK_V)
        lp = (tl.load(src + target).to(tl.float32) * scale - lse2) * _LN2
        dlogp = token_dlogp(lp, tl.load(old_ptr + tok), tl.load(ref_ptr + tok), tl.load(adv_ptr + tok),
                            tl.load(weight_ptr + tok), eps_low, eps_high, delta, beta, HAS_OLD, USE_KL, HAS_DELTA)
        tl.store(logp_ptr + tok, lp)
        tl.store(lse_ptr + tok, lse2 * _LN2)
        tl.store(dlogp_ptr + tok, dlogp)
        if WITH_ENTROPY:
            tl.store(entropy_ptr + tok, entropy2 * _LN2)
        coef = dlogp * inv_temperature
    _write_dlogits(src, dst, V, scale, lse2, coef, target, BLOCK_V)


@triton.jit
def _logprob_bwd_kernel(
    logits_ptr, stride_row,     # as in forward
    dlogits_ptr, stride_drow,   # (R, V) out, logits dtype; may alias logits_ptr (in place)
    target_ptr, lse_ptr,        # (N,) int64, (N,) fp32 from forward
    dlogp_ptr,                  # (N,) fp32: dLoss/dlogp per token
    grad_out_ptr,               # () fp32: upstream gradient of the scalar loss
    row_off_ptr,                # (N,) int64 as in forward, if INDIRECT
    tok_of_row_ptr,             # (R,) int64 token of each output row or -1, if INDIRECT
    V, scale, inv_temperature,
    INDIRECT: tl.constexpr, ROW_ALIGN: tl.constexpr, LSE_FROM_ROW: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """dlogits[row] = grad_out * dlogp[tok] / T * (onehot(target) - softmax(logits / T)).

    Direct: output row r is token r, read at r * stride_row. Indirect (padded layouts):
    output row r holds token tok_of_row[r] (or nothing, -1: a zero row), read at row_off[tok].
    LSE_FROM_ROW: the softmax's logsumexp is swept from the row itself (lse_ptr unread), for
    rows recomputed after the forward (_triton_hidden's chunks): a stored lse of other
    roundings of the same logits would make probabilities that do not sum to 1.
    """
    row = tl.program_id(0).to(tl.int64)
    tok, has_tok, src = _output_row_source(row, logits_ptr, stride_row, row_off_ptr, tok_of_row_ptr, INDIRECT,
                                           ROW_ALIGN)
    coef = tl.load(grad_out_ptr).to(tl.float32) * tl.load(dlogp_ptr + tok) * inv_temperature
    coef = tl.where(has_tok, coef, 0.0)
    if LSE_FROM_ROW:
        lse2 = tl.zeros((), tl.float32)
        if coef != 0.0:  # a zero row is written without reading its logits
            lse2, _ = _row_logsumexp(src, V, scale, False, BLOCK_V)
    else:
        lse2 = tl.load(lse_ptr + tok) * _LOG2E
    target = tl.load(target_ptr + tok)
    _write_dlogits(src, dlogits_ptr + row * stride_drow, V, scale, lse2, coef, target, BLOCK_V)


# ----------------------------------------------------------------------------- launchers


# Registers per thread both kernels must fit (checked by tests/kernels/test_sm_compile.py
# on sm_80 and sm_90 at the real shapes; they use 32-54): 4 CTAs of 8 warps per SM, enough
# loads in flight for a stream of 16-byte vectors.
REGISTER_BUDGET = 64

# Vocabulary elements per loop iteration: 4096 lanes are 16 B per thread per load at 8
# warps, enough loads in flight to stream a 300 KB row. Tests lower it so that small
# vocabularies still cross several blocks.
MAX_BLOCK_V = 4096


def _block_v(V: int) -> int:
    return min(MAX_BLOCK_V, triton.next_power_of_2(V))


def row_align(logits) -> int:
    """Elements every row offset of `logits` (..., V) is a multiple of: 16 bytes' worth when
    all its row strides allow 16-byte vector loads, else the largest power of 2 they allow
    (the base pointer's alignment is a separate specialization of the launch)."""
    return math.gcd(16 // logits.element_size(), *logits.stride()[:-1])


def logprob_fwd(logits, target_ids, row_off, temperature: float, with_entropy: bool):
    """Per-token log-probs in one sweep of the vocabulary.

    logits: (..., V) fp32/bf16/fp16, unit stride along V. target_ids: (N,) int64.
    row_off: (N,) int64 element offset of each token's row from logits' first element, or
    None when logits is (N, V) and row t is token t.
    Returns logp, lse, entropy: (N,) fp32 each (entropy empty unless with_entropy).
    """
    N, V = target_ids.shape[0], logits.shape[-1]
    logp = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
    if N == 0:
        return logp, lse, entropy
    _logprob_fwd_kernel[(N,)](
        logits, logits.stride(0), target_ids, row_off if row_off is not None else target_ids,
        logp, lse, entropy if with_entropy else logp,
        V, LOG2E / temperature,
        HAS_ROW_OFF=row_off is not None, WITH_ENTROPY=with_entropy,
        ROW_ALIGN=row_align(logits) if row_off is not None else 1, BLOCK_V=_block_v(V), num_warps=8,
    )
    return logp, lse, entropy


def logprob_bwd(logits, target_ids, lse, dlogp, grad_out, row_off, tok_of_row,
                temperature: float, out):
    """Write dLoss/dlogits into `out` (R, V), which may be a view of `logits` (in place).

    lse: (N,) fp32 logsumexp(logits / T) from the forward over these very logits, or None
    to sweep it from each row first (one more read of the row, from L2 while it is fresh):
    the form for logits recomputed in the backward, whose rounding is not the forward's.
    dlogp: (N,) fp32 dLoss/dlogp per token; grad_out: () fp32 on the device.
    Direct (row_off and tok_of_row None): logits is (R, V) and row r is token r.
    Indirect: row_off (N,) int64 as in logprob_fwd, tok_of_row (R,) int64 token of each
    output row or -1 (a zero row).
    """
    R, V = out.shape
    if R == 0:
        return out
    indirect = tok_of_row is not None
    _logprob_bwd_kernel[(R,)](
        logits, logits.stride(0), out, out.stride(0), target_ids, lse if lse is not None else dlogp, dlogp,
        grad_out.to(torch.float32), row_off if indirect else target_ids,
        tok_of_row if indirect else target_ids,
        V, LOG2E / temperature, 1.0 / temperature,
        INDIRECT=indirect, ROW_ALIGN=row_align(logits) if indirect else 1, LSE_FROM_ROW=lse is None,
        BLOCK_V=_block_v(V),
        num_warps=8,
    )
    return out



def logprob_fwd_bwd(logits, target_ids, row_off, tok_of_row, old_logp, ref_logp, adv_tok, weight_tok,
                    temperature: float, with_entropy: bool, *, eps_low: float, eps_high: float, delta,
                    beta: float, out):
    """The token-level loss's forward and backward in one launch (_logprob_fwd_bwd_kernel):
    dLoss/dlogits for an upstream gradient of 1 into `out` (R, V) (direct: R = N, row t is
    token t; indirect: row_off and tok_of_row as in logprob_bwd). old_logp, ref_logp: (N,)
    fp32 or None; adv_tok, weight_tok: (N,) fp32 per token. Returns logp, lse, entropy
    (empty unless with_entropy) and dlogp, (N,) fp32."""
    N, (R, V) = target_ids.shape[0], out.shape
    logp = torch.empty(N, dtype=torch.float32, device=out.device)
    lse, dlogp = torch.empty_like(logp), torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
    if R == 0:
        return logp, lse, entropy, dlogp
    indirect = tok_of_row is not None
    _logprob_fwd_bwd_kernel[(R,)](
        logits, logits.stride(0), out, out.stride(0), target_ids,
        row_off if indirect else target_ids, tok_of_row if indirect else target_ids,
        old_logp if old_logp is not None else adv_tok, ref_logp if ref_logp is not None else adv_tok,
        adv_tok, weight_tok, logp, lse, entropy if with_entropy else logp, dlogp,
        V, LOG2E / temperature, 1.0 / temperature, eps_low, eps_high, delta if delta is not None else 0.0, beta,
        INDIRECT=indirect, ROW_ALIGN=row_align(logits) if indirect else 1, WITH_ENTROPY=with_entropy,
        HAS_OLD=old_logp is not None, USE_KL=ref_logp is not None and beta != 0.0, HAS_DELTA=delta is not None,
        BLOCK_V=_block_v(V), num_warps=8,
    )
    return logp, lse, entropy, dlogp
