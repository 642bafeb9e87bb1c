"""The loss from logits: per-token log-probs and the GRPO loss, forward and backward, over
(N, V) or (B, L, V) logits. Read in order: the Triton kernels, their launchers, the custom
ops with their autograd rules, then the public functions token_logprobs and grpo_loss.

The kernels sweep the vocabulary, one program per row, tokens on grid axis 0 (2**31 - 1
programs, so a million tokens are fine; grid axes 1 and 2 stop at 65,535, Liger #1294). A
row's offset is computed in int64: N * V passes 2**31 at N = 16384, V = 151936.

Arithmetic is fp32 whatever the logits dtype (the Triton interpreter cannot do bf16
arithmetic, and the logsumexp needs fp32 anyway). Exponentials are base 2 on pre-scaled
values: y = x * log2(e) / T, so softmax(x / T) = 2**(y - max y) / sum 2**(y - max y) costs
one multiply and one ex2 per element.

Rows of the logits are addressed either directly (logits (N, V), row t = token t) or, for
padded (B, L, V) layouts, through `flat_idx` (N,) int64: the position b * L + l of each
token, so strided views such as logits[:, :-1] are read in place without a copy.

Two ways through the loss. Two sweeps (grpo_loss_fwd): forward reads the logits, backward
(grpo_loss_bwd) reads them again and writes dlogits: three passes over N x V. One sweep
(grpo_loss_one_sweep, Triton, token-level importance sampling): a token's dLoss/dlogp is
known as soon as its logsumexp is, so logprob_fwd_bwd writes its dlogits row in forward,
reading the row a second time while it is still in L2: one read from memory and one write.
Backward only scales the saved dlogits by the upstream gradient; when that is exactly 1
(loss.backward() on this loss) it hands them over as they are (one scalar host sync; under
torch.compile it always multiplies). Any other upstream gradient rounds the gradient twice in
the logits' dtype (stored, then scaled): up to one ulp instead of half of one. Memory: the
dlogits buffer (logits' shape and dtype) exists from forward to backward instead of during
backward only. grpo_loss takes the one sweep only when the logits need a gradient, without
inplace_backward (which writes over the logits in backward): the sequence level, the other
loss types and options, the in-place option and the eager path keep the two sweeps.

The eager path of every op is the torch reference (reference.py), chosen by `impl`.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import options, reference
from .options import GRPOLossOutput, TermsConfig
from .registry import LIBRARY, fake_loss_outputs, input_grads, named_inputs, op
from .terms import loss_terms, terms_config, token_dlogp

LN2 = math.log(2.0)
LOG2E = 1.0 / LN2  # exp(x) = 2**(x * LOG2E), ln(x) = log2(x) * LN2; hidden.py uses them too
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
    rows recomputed after the forward (hidden.py's chunks): a stored lse of other
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


# ----------------------------------------------------------------------------- custom ops and autograd


def _vocab_sweeps(impl: str):
    """(logprob_fwd, logprob_bwd) of an implementation: the launchers above ("triton") or the
    torch reference's ("torch"), with the same contracts."""
    if impl == "torch":
        return reference.logprob_fwd, reference.logprob_bwd
    return logprob_fwd, logprob_bwd


def row_offsets(logits: Tensor, flat_idx: Optional[Tensor]) -> Optional[Tensor]:
    """Element offset of each token's row: (N,) int64, or None for direct addressing."""
    if flat_idx is None:
        return None
    if logits.dim() == 2:
        return flat_idx * logits.stride(0)
    L = logits.shape[1]
    return (flat_idx // L) * logits.stride(0) + (flat_idx % L) * logits.stride(1)


@torch.library.custom_op(f"{LIBRARY}::token_logprobs", mutates_args=())
def token_logprobs_op(logits: Tensor, target_ids: Tensor, flat_idx: Optional[Tensor],
                      temperature: float, with_entropy: bool, impl: str) -> tuple[Tensor, Tensor]:
    """(N,) fp32 log-probs and entropies (empty unless with_entropy) of the target tokens."""
    logprob_fwd_impl, _ = _vocab_sweeps(impl)
    logp, _, entropy = logprob_fwd_impl(logits, target_ids, row_offsets(logits, flat_idx), temperature, with_entropy)
    return logp, entropy


@token_logprobs_op.register_fake
def _(logits, target_ids, flat_idx, temperature, with_entropy, impl):
    n = target_ids.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n if with_entropy else 0, dtype=torch.float32)


def grpo_loss_fwd(
    logits: Tensor, target_ids: Tensor, flat_idx: Optional[Tensor], cu_seqlens: Tensor,
    advantages: Tensor, old_logp: Optional[Tensor], ref_logp: Optional[Tensor],
    policy_weight: Optional[Tensor], sampling_logp: Optional[Tensor],
    vespo_log_offset: Optional[Tensor], temperature: float,
    beta: float, eps_low: float, eps_high: float, delta: Optional[float], inv_norm: float,
    per_seq_mean: bool, seq_level: bool, policy: str, sapo_tau_pos: float, sapo_tau_neg: float,
    off_policy_threshold: Optional[float], bias_correction_kl: bool, vespo_k_pos: float,
    vespo_lambda_pos: float, vespo_k_neg: float, vespo_lambda_neg: float, with_entropy: bool,
    inplace_backward: bool, impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns loss (), logp (N,), lse (N,), dlogp (N,), kl (N,) or (0,), entropy (N,) or (0,),
    clip_low_frac (), clip_high_frac (), all fp32. The epilogue's scalars (beta ...
    bias_correction_kl) are those of options.TermsConfig. inplace_backward is read by the
    autograd rule only."""
    cfg = terms_config(locals())  # first statement: locals() holds exactly the arguments
    logprob_fwd_impl, _ = _vocab_sweeps(impl)
    logp, lse, entropy = logprob_fwd_impl(logits, target_ids, row_offsets(logits, flat_idx), temperature, with_entropy)
    return loss_terms(impl, logp, lse, entropy, old_logp, ref_logp, policy_weight, sampling_logp,
                      vespo_log_offset, advantages, cu_seqlens, cfg)


grpo_loss_fwd_op = torch.library.custom_op(f"{LIBRARY}::grpo_loss_fwd", mutates_args=())(grpo_loss_fwd)


@grpo_loss_fwd_op.register_fake
def _(*args, **kwargs):
    x = named_inputs(grpo_loss_fwd, args, kwargs)
    return fake_loss_outputs(x["logits"], x["target_ids"].shape[0], x["ref_logp"] is not None, x["with_entropy"])


def _write_grad(grad_loss, logits, target_ids, flat_idx, lse, dlogp, temperature, impl, out2d):
    """dLoss/dlogits into out2d (rows of logits flattened over the leading dims, V)."""
    if flat_idx is None:
        row_off = tok_of_row = None
    else:
        row_off = row_offsets(logits, flat_idx)
        tok_of_row = torch.full((out2d.shape[0],), -1, dtype=torch.int64, device=out2d.device)
        tok_of_row[flat_idx] = torch.arange(flat_idx.shape[0], device=out2d.device)
    _, logprob_bwd_impl = _vocab_sweeps(impl)
    logprob_bwd_impl(logits, target_ids, lse, dlogp, grad_loss, row_off, tok_of_row, temperature, out2d)


@torch.library.custom_op(f"{LIBRARY}::grpo_loss_bwd", mutates_args=())
def grpo_loss_bwd_op(grad_loss: Tensor, logits: Tensor, target_ids: Tensor,
                     flat_idx: Optional[Tensor], lse: Tensor, dlogp: Tensor, temperature: float,
                     impl: str) -> Tensor:
    """dLoss/dlogits, a new contiguous tensor of logits' shape and dtype."""
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _write_grad(grad_loss, logits, target_ids, flat_idx, lse, dlogp, temperature, impl,
                out.view(-1, logits.shape[-1]))
    return out


@grpo_loss_bwd_op.register_fake
def _(grad_loss, logits, target_ids, flat_idx, lse, dlogp, temperature, impl):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op(f"{LIBRARY}::grpo_loss_bwd_inplace", mutates_args=("logits",))
def grpo_loss_bwd_inplace_op(grad_loss: Tensor, logits: Tensor, target_ids: Tensor,
                             flat_idx: Optional[Tensor], lse: Tensor, dlogp: Tensor,
                             temperature: float, impl: str) -> None:
    """dLoss/dlogits written over logits (which must be viewable as (rows, V)). Declared as a
    mutation, so autograd bumps logits' version counter: a later backward through another
    use of these logits fails loudly instead of reading gradients as logits (Liger #272)."""
    _write_grad(grad_loss, logits, target_ids, flat_idx, lse, dlogp, temperature, impl,
                logits.view(-1, logits.shape[-1]))


@grpo_loss_bwd_inplace_op.register_fake
def _(grad_loss, logits, target_ids, flat_idx, lse, dlogp, temperature, impl):
    return None


def _two_sweeps_setup_context(ctx, inputs, output):
    x = named_inputs(grpo_loss_fwd, inputs)
    _, _, lse, dlogp, *_ = output
    ctx.save_for_backward(x["logits"], x["target_ids"], x["flat_idx"], lse, dlogp)
    ctx.temperature, ctx.inplace, ctx.impl = x["temperature"], x["inplace_backward"], x["impl"]


def _two_sweeps_backward(ctx, grad_loss, *_unused_grads):
    logits, target_ids, flat_idx, lse, dlogp = ctx.saved_tensors
    args = (grad_loss, logits, target_ids, flat_idx, lse, dlogp, ctx.temperature, ctx.impl)
    if ctx.inplace:
        op("grpo_loss_bwd_inplace")(*args)
        dlogits = logits
    else:
        dlogits = op("grpo_loss_bwd")(*args)
    return input_grads(grpo_loss_fwd, logits=dlogits)


grpo_loss_fwd_op.register_autograd(_two_sweeps_backward, setup_context=_two_sweeps_setup_context)


# ----------------------------------------------------------------------------- the loss in one sweep (Triton)


def _per_token(cu_seqlens: Tensor, advantages: Tensor, n_tokens: int, inv_norm: float, per_seq_mean: bool):
    """(N,) fp32 advantage and loss weight of each token, from its sequence."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    seq = torch.repeat_interleave(torch.arange(lens.shape[0], device=lens.device), lens, output_size=n_tokens)
    weight = inv_norm / lens.clamp(min=1).float() if per_seq_mean else torch.full_like(advantages, inv_norm)
    return advantages[seq].contiguous(), weight[seq].contiguous()


def grpo_loss_one_sweep(
    logits: Tensor, target_ids: Tensor, flat_idx: Optional[Tensor], cu_seqlens: Tensor,
    advantages: Tensor, old_logp: Optional[Tensor], ref_logp: Optional[Tensor],
    temperature: float, beta: float, eps_low: float, eps_high: float, delta: Optional[float],
    inv_norm: float, per_seq_mean: bool, with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The outputs of grpo_loss_fwd (token level), then dLoss/dlogits for an upstream
    gradient of 1: a new tensor of logits' shape and dtype (zero rows off the mask). Triton
    only."""
    n, V = target_ids.shape[0], logits.shape[-1]
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    out2d = dlogits.view(-1, V)
    if flat_idx is None:
        rows, row_off, tok_of_row = logits.view(-1, V), None, None
    else:
        rows, row_off = logits, row_offsets(logits, flat_idx)
        tok_of_row = torch.full((out2d.shape[0],), -1, dtype=torch.int64, device=logits.device)
        tok_of_row[flat_idx] = torch.arange(n, device=logits.device)
    adv_tok, weight_tok = _per_token(cu_seqlens, advantages, n, inv_norm, per_seq_mean)
    logp, lse, entropy, dlogp = logprob_fwd_bwd(
        rows, target_ids, row_off, tok_of_row, old_logp, ref_logp, adv_tok, weight_tok, temperature,
        with_entropy, eps_low=eps_low, eps_high=eps_high, delta=delta, beta=beta, out=out2d)
    # The clipped policy term only (grpo_loss sends the other options to the two-sweep op).
    cfg = TermsConfig(eps_low=eps_low, eps_high=eps_high, delta=delta, beta=beta, inv_norm=inv_norm,
                      per_seq_mean=per_seq_mean, seq_level=False)
    outputs = loss_terms("triton", logp, lse, entropy, old_logp, ref_logp, None, None, None, advantages,
                         cu_seqlens, cfg)
    loss, logp, lse, _, kl, entropy, low, high = outputs
    return loss, logp, lse, dlogp, kl, entropy, low, high, dlogits


grpo_loss_one_sweep_op = torch.library.custom_op(f"{LIBRARY}::grpo_loss_one_sweep", mutates_args=())(
    grpo_loss_one_sweep)


@grpo_loss_one_sweep_op.register_fake
def _(logits, target_ids, flat_idx, cu_seqlens, advantages, old_logp, ref_logp, temperature, beta, eps_low,
      eps_high, delta, inv_norm, per_seq_mean, with_entropy):
    outputs = fake_loss_outputs(logits, target_ids.shape[0], ref_logp is not None, with_entropy)
    return outputs + (torch.empty(logits.shape, dtype=logits.dtype, device=logits.device),)


def _one_sweep_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[-1])


def _one_sweep_backward(ctx, grad_loss, *_unused_grads):
    dlogits, = ctx.saved_tensors
    if not torch.compiler.is_compiling() and bool(grad_loss == 1):
        scaled = dlogits
    else:
        scaled = dlogits * grad_loss.to(dlogits.dtype)
    return input_grads(grpo_loss_one_sweep, logits=scaled)


grpo_loss_one_sweep_op.register_autograd(_one_sweep_backward, setup_context=_one_sweep_setup_context)


# ----------------------------------------------------------------------------- public


def token_logprobs(logits: Tensor, target_ids: Tensor, temperature: float = 1.0,
                   return_entropy: bool = False, impl: Optional[str] = None):
    """log softmax(logits / T)[target] per token, in fp32, without gradient.

    logits: (..., V) fp32/bf16/fp16 with unit stride along V (strided views such as
    logits[:, :-1] of a (B, L+1, V) tensor are read in place). target_ids: (...) integer.
    Returns logp (...) fp32, or (logp, entropy) with return_entropy.
    """
    options.check_logits(logits)
    lead, V = logits.shape[:-1], logits.shape[-1]
    target = options.check_ids(target_ids, lead, logits.device).reshape(-1)
    options.check_temperature(temperature)
    impl = options.resolve_impl(impl, logits.device)
    rows, flat_idx = _as_rows(logits)
    options.device_checks(options.id_range_checks(target, V), {})
    with torch.no_grad():
        logp, entropy = op("token_logprobs")(rows, target, flat_idx, float(temperature), return_entropy, impl)
    logp = logp.view(lead)
    return (logp, entropy.view(lead)) if return_entropy else logp


def grpo_loss(
    logits: Tensor, target_ids: Tensor, cu_seqlens: Optional[Tensor] = None,
    advantages: Optional[Tensor] = None, old_logp: Optional[Tensor] = None,
    ref_logp: Optional[Tensor] = None, *, completion_mask: Optional[Tensor] = None,
    rewards: Optional[Tensor] = None, group_size: Optional[int] = None,
    scale_rewards: str = "group", temperature: float = 1.0, beta: float = 0.0,
    epsilon_low: float = 0.2, epsilon_high: float = 0.2, delta: Optional[float] = None,
    loss_type: str = "grpo", importance_sampling_level: str = "token",
    max_completion_length: Optional[int] = None, num_items_in_batch: Optional[float] = None,
    policy_weight: Optional[Tensor] = None, off_policy_threshold: Optional[float] = None,
    sampling_logp: Optional[Tensor] = None, bias_correction_kl: bool = False,
    sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0, vespo_log_offset: Optional[Tensor] = None,
    return_entropy: bool = False, inplace_backward: bool = False, impl: Optional[str] = None,
) -> GRPOLossOutput:
    """The GRPO loss from logits. Triton, token-level importance sampling: forward and
    backward in one sweep (each row read twice while in L2, dlogits written in forward).
    Otherwise one sweep of the vocabulary forward, one backward.

    Packed layout:
        logits      (N, V) fp32 / bf16 / fp16, unit stride along V: row t scores target_ids[t]
        target_ids  (N,) int64 (any integer dtype), 0 <= id < V
        cu_seqlens  (S+1,) int32: sequence s owns rows cu_seqlens[s]:cu_seqlens[s+1]
    Padded layout (TRL, verl): logits (B, L, V) (a strided view like logits[:, :-1] is read
        in place), target_ids (B, L), completion_mask (B, L) of 0/1 (default: all ones),
        cu_seqlens None; S = B. Token-shaped inputs and outputs are then (B, L).
    advantages  (S,) float, one per sequence; or rewards (S,) + group_size, normalized here
                by group_advantages(rewards, group_size, scale_rewards) (eps 1e-4).
    old_logp    (N,) float log-probs of the sampling policy; None = on-policy (old =
                logp.detach(), ratio 1).
    ref_logp    (N,) float reference log-probs; required when beta != 0.

    Per token: ratio = exp(logp - old_logp), or at importance_sampling_level="sequence"
    (GSPO) exp(mean over the sequence of logp - old_logp), and
        loss_t = policy_weight_t * keep_s * policy_t + beta * KL_t
    with TRL's (1.16) terms, by loss_type:
        grpo, bnpo, dr_grpo, dapo, luspo: policy_t = -min(ratio A, clamp(ratio, 1 - epsilon_low,
            1 + epsilon_high) A), ratio capped at delta if given (two-sided clipping);
        cispo: policy_t = -sg(min(ratio, epsilon_high)) A logp_t (no gradient through the ratio);
        sapo: policy_t = -sigmoid(tau (ratio - 1)) 4 / tau A, tau = sapo_temperature_pos if
            A > 0 else sapo_temperature_neg;
    KL_t = exp(ref - logp) - (ref - logp) - 1, times the ratio with bias_correction_kl.
    policy_weight (N,) | (B, L) float, no gradient: TRL's vLLM importance-sampling
    correction (token or sequence level, broadcast to tokens), its entropy mask, or any
    product of them; default 1. keep_s, the off-policy sequence mask (DeepSeek-V3.2, TRL's
    off_policy_mask_threshold), is 1 unless off_policy_threshold is given: then a sequence
    with A < 0 is dropped when its mean of sampling_logp - logp (NaN counted as 0) exceeds
    the threshold; sampling_logp (same shape as old_logp) defaults to old_logp.
        vespo: policy_t = -sg(phi_s) A logp_t, phi_s = exp(lam + k log w - lam w) with
            log w = clamp(sum over the sequence of clamp(logp - old, -20, 20) + vespo_log_offset_s,
            log 1e-8, 20) and (k, lam) = (vespo_k_pos, vespo_lambda_pos) if A >= 0 else the
            _neg pair (TRL's vespo; vespo_log_offset (S,): its summed, clamped log vLLM ratios);
    Reduction: "grpo" and "sapo" mean over sequences of each sequence's token mean;
    "bnpo" sum / N; "dr_grpo" sum / (S * max_completion_length) (default: the longest
    sequence, or L in the padded layout); "dapo", "cispo" and "vespo" sum / num_items_in_batch
    (default N); "luspo" sum / S.

    inplace_backward: the backward writes dlogits over the logits, saving one N x V buffer.
    Hazard: the logits tensor holds gradients afterwards; any other use of it must come
    before backward. Its version counter is bumped, so another autograd use of it fails
    loudly rather than silently. Needs logits viewable as (rows, V).

    Host syncs: one, for the input checks (ids in range, cu_seqlens well-formed) and the
    dr_grpo default; the padded layout adds one to count its tokens. Under torch.compile
    the checks are skipped; give max_completion_length for dr_grpo there.
    impl: None picks Triton for CUDA tensors, eager torch on CPU (Triton there too when
    TRITON_INTERPRET=1); "triton" or "torch" forces one.
    """
    options.check_logits(logits)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be (N, V) packed or (B, L, V) padded, got shape {tuple(logits.shape)}")
    options.check_hyperparameters(temperature, epsilon_low, epsilon_high, delta, beta, ref_logp, loss_type,
                                  importance_sampling_level)
    options.check_policy_options(loss_type, epsilon_high, sapo_temperature_pos, sapo_temperature_neg,
                                 off_policy_threshold, sampling_logp)
    setup = options.prepare_loss(
        "logits", logits.shape[:-1], logits.shape[-1], logits.device, target_ids, cu_seqlens,
        completion_mask, advantages, old_logp, ref_logp, rewards=rewards, group_size=group_size,
        scale_rewards=scale_rewards, loss_type=loss_type, max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch, impl=impl, policy_weight=policy_weight,
        sampling_logp=sampling_logp)
    if inplace_backward and logits.dim() == 3 and not logits.is_contiguous():
        raise ValueError("inplace_backward needs contiguous padded logits (B, L, V)")
    if (importance_sampling_level == "token" and not inplace_backward and setup.impl == "triton"
            and logits.requires_grad and torch.is_grad_enabled() and _one_sweep_covers(
                loss_type, setup, off_policy_threshold, bias_correction_kl)):
        # One sweep: dlogits written in forward (grpo_loss_one_sweep; the two-sweep path below
        # stays for the sequence level, the in-place option and the eager path).
        loss, logp, _, _, kl, entropy, low, high, _ = op("grpo_loss_one_sweep")(
            logits, setup.target, setup.flat_idx, setup.cu_seqlens, setup.advantages, setup.old_logp,
            setup.ref_logp, float(temperature), float(beta), float(epsilon_low), float(epsilon_high),
            None if delta is None else float(delta), setup.inv_norm, loss_type == "grpo", return_entropy)
        return options.make_output(setup, loss, logp, kl, entropy, low, high, return_entropy)
    loss, logp, _, _, kl, entropy, low, high = op("grpo_loss_fwd")(
        logits=logits, target_ids=setup.target, flat_idx=setup.flat_idx, temperature=float(temperature),
        with_entropy=return_entropy, inplace_backward=inplace_backward,
        **options.epilogue_arguments(
            setup, loss_type, importance_sampling_level, beta, epsilon_low, epsilon_high, delta, off_policy_threshold,
            bias_correction_kl, sapo_temperature_pos, sapo_temperature_neg,
            (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg), vespo_log_offset))
    return options.make_output(setup, loss, logp, kl, entropy, low, high, return_entropy)


def _one_sweep_covers(loss_type, setup: options.LossSetup, off_policy_threshold, bias_correction_kl) -> bool:
    """Whether the one-sweep op computes this loss: the clipped policy term of the four
    original loss types with no per-token weight, sampling log-probs, off-policy mask or
    bias-corrected KL (those options go through the two-sweep epilogue)."""
    return (loss_type in ("grpo", "bnpo", "dr_grpo", "dapo") and setup.policy_weight is None
            and setup.sampling_logp is None and off_policy_threshold is None and not bias_correction_kl)


def _as_rows(logits: Tensor):
    """(rows, flat_idx): logits as (R, V) when a view allows it, else (B, L, V) with every
    position indexed (strided views are read in place, never copied)."""
    try:
        return logits.view(-1, logits.shape[-1]), None
    except RuntimeError:
        if logits.dim() != 3:
            raise ValueError("logits with more than 2 leading dimensions must be viewable as (rows, V)") from None
        n = logits.shape[0] * logits.shape[1]
        return logits, torch.arange(n, device=logits.device)
