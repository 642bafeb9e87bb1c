"""The loss from hidden states, lm_head fused: per-token log-probs and the GRPO loss straight
from the final hidden states and the lm_head weight. The (N, V) logits are never written to
memory: at Qwen2-VL's vocabulary (151,936) they would dominate a GRPO step's memory. Read in
order: the Triton kernel, the launchers (forward; backward by chunks), the custom ops with
their autograd rule, then the public functions token_logprobs_from_hidden and
grpo_loss_from_hidden. The eager path of every op is the torch reference (reference.py).

Forward, one fused pass over the vocabulary, the (N, V) logits never written to memory:
each program takes BLOCK_N tokens and one slice of the vocabulary, computes logit tiles
hidden @ weight^T on chip (tl.dot, fp32 accumulation), and carries an online logsumexp (and
the entropy's sum) over its slice; the target logit is picked up on the way. The slices'
partial sums are merged per token afterwards (O(N) work). Splitting the vocabulary keeps the
GPU busy when N is small.

Backward, by token chunks, with no atomics: for each chunk of C tokens the logits
hidden_c @ weight^T (+ bias) are materialized in the input dtype by a cuBLAS matmul (fp32
sums, one rounding to bf16/fp16), the vocabulary kernel of logits.py overwrites them in
place with dlogits = coef_t * (onehot - softmax(logits / T)), coef_t = dLoss/dlogp_t * grad
/ T (the per-token factor applied before any reduction over tokens, Liger #1298), then
dhidden_c = dlogits @ weight and dweight += dlogits^T @ hidden_c are two more matmuls.

Which logits the softmax is taken of: the chunk's own. Its logsumexp is swept from the rounded
chunk row itself (one more read of a row still in L2) rather than taken from the forward,
whose lse came from fp32 sums that were never rounded: with the forward's lse the
probabilities of a bf16 chunk do not sum to 1, off by up to |logit| * 2**-9 / T, and for a
confident token 1 - p(target) is swamped (a replay at V = 151936, T = 1.2: dlogits'
median relative error 23 at p(target) = 0.999, with sign flips; from the chunk's own lse,
0.02-0.03, the error the bf16 rounding of the logits implies). The alternative, fp32 chunks, would halve
the tokens per chunk for the same memory, need a separate bf16 copy of dlogits for the
tensor-core matmuls, and still meet the forward's lse from other fp32 sums; it was not chosen.
dweight and dbias are accumulated in fp32 across chunks (cuBLAS's fp32-output GEMM adds each
chunk's fp32 products into the fp32 sum); per-chunk rounding of a bf16 sum would add up to half
a bf16 ulp of the running sum per chunk.

Tokens whose coef is exactly 0 (zero advantage, no KL) have zero gradient rows and are left
out of the chunks (one host sync to count them); nothing is skipped on its values.
Flops: 6 C H V per chunk, 6NHV in all (8NHV with the forward), all on the tensor cores.
Extra memory, beyond the gradients dhidden (N, H) in the input dtype and dweight (V, H), dbias
(V,) in fp32 (4VH bytes: 2.2 GB at V = 151936, H = 3584; the backward op casts them to the
weight's dtype at the end, 2VH more for the copy): one logits chunk, at most CHUNK_BYTES (C =
CHUNK_BYTES / (V * element size) tokens rounded down to a multiple of 128, 512 MiB: 1664
tokens at V = 151936 in bf16), plus the gathered hidden rows of the tokens with a gradient (at
most N x H: 117 MB at N = 16384, H = 3584 in bf16). fp32 inputs multiply in fp32 unless
torch.backends.cuda.matmul.allow_tf32 is set (the chunk's own lse keeps TF32 consistent too).

The atomic design it replaces (one (BLOCK_N, BLOCK_V) tile per program, fp32 atomic adds
into dhidden and dweight) moved 2.1e11 atomic adds, about 836 GB, per backward at
N = 16384, H = 3584, V = 151936: traffic growing with N x V x H / tile. No GPU measurement
has compared the two yet; the design argument alone decided.

Off a GPU (the interpreter's tests) the backward runs the same half-precision steps with
cuBLAS emulated in torch (_Matmuls: fp32 products and sums, then the one rounding cuBLAS
makes), so the CPU tests see the GPU's numerics. The forward's UPCAST loads tiles as fp32
before tl.dot there: bf16 arithmetic is broken in the interpreter; on a GPU half-precision
tiles go to the tensor cores as they are, with fp32 accumulation, which UPCAST reproduces.
"""
import logging
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import options, reference
from .logits import LN2, LOG2E, logprob_bwd
from .options import GRPOLossOutput, interpreting
from .registry import LIBRARY, fake_loss_outputs, input_grads, named_inputs, op
from .terms import loss_terms, terms_config

logger = logging.getLogger(__name__)

# Forward tiles under the interpreter; tests lower them so that small shapes cross several.
BLOCK_N, BLOCK_V, BLOCK_H = 64, 128, 64
TARGET_PROGRAMS = 264  # about two programs per SM on an H100/H200
CHUNK_BYTES = 1 << 29  # backward: bytes of one materialized logits chunk (512 MiB)

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

    # Online logsumexp per token over this vocabulary slice, as in logits.py.
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


# ----------------------------------------------------------------------------- launchers


# Forward launch configuration per (input dtype, GPU major version), checked by
# tests/kernels/test_sm_compile.py against the register budget stated here (ptxas at the
# real shapes, the bias + entropy variant included):
#   (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages, maxnreg), register budget
# Half precision goes to the tensor cores. On sm_90 the tile needs 137 registers unbounded,
# which allows only one CTA of 256 threads per SM (65536 registers); capped at 128 it fits
# two without spilling. sm_80 stays at one (184 registers; capping spills 140-200 bytes).
# fp32 uses exact fp32 FMA products ("ieee", to match the eager path) that Triton unrolls
# completely: 32 x 64 x 32 tiles keep them in registers (64 x 128 x 64 spilled 6-9 KB of
# stack per thread). Every shared memory footprint fits sm_86 / sm_89's 99 KB per block.
FWD_CONFIGS = {
    ("half", 9): ((64, 128, 64, 8, 3, 128), 128),
    ("half", 8): ((64, 128, 64, 8, 3, None), 192),
    ("fp32", 9): ((32, 64, 32, 8, 2, None), 128),
    ("fp32", 8): ((32, 64, 32, 8, 2, None), 128),
}


def capability(device: torch.device) -> tuple:
    """(major, minor) of a CUDA device; the compile check substitutes its target's."""
    return torch.cuda.get_device_capability(device)


def _fwd_config(dtype, device):
    """(BLOCK_N, BLOCK_V, BLOCK_H, upcast, launch options)."""
    if interpreting():
        # bf16 arithmetic is broken in the interpreter: everything upcast, exact fp32 dots.
        return BLOCK_N, BLOCK_V, BLOCK_H, True, {"num_warps": 4}
    major = min(max(capability(device)[0], 8), 9)
    kind = "fp32" if dtype == torch.float32 else "half"
    (block_n, block_v, block_h, warps, stages, maxnreg), _budget = FWD_CONFIGS[(kind, major)]
    options = {"num_warps": warps, "num_stages": stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return block_n, block_v, block_h, kind == "fp32", options


def logprob_fwd_from_hidden(hidden, weight, bias, target_ids, temperature: float, with_entropy: bool):
    """hidden (N, H), weight (V, H), bias (V,) or None, unit stride along H; target_ids (N,)
    int64. Returns logp, lse, entropy: (N,) fp32 (entropy empty unless with_entropy)."""
    N, H = hidden.shape
    V = weight.shape[0]
    block_n, block_v, block_h, upcast, options = _fwd_config(hidden.dtype, hidden.device)
    blocks_n = triton.cdiv(N, block_n)
    splits = max(1, min(triton.cdiv(V, block_v), triton.cdiv(TARGET_PROGRAMS, max(blocks_n, 1))))
    v_per_split = triton.cdiv(triton.cdiv(V, splits), block_v) * block_v
    splits = triton.cdiv(V, v_per_split)
    part = torch.empty(4, splits, N, dtype=torch.float32, device=hidden.device)
    if N > 0:
        _hidden_fwd_kernel[(blocks_n, splits)](
            hidden, hidden.stride(0), weight, weight.stride(0), bias if bias is not None else weight,
            target_ids, part, N, V, H, v_per_split, LOG2E / temperature,
            HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, UPCAST=upcast, DOT_PRECISION="ieee",
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, **options,
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
    logp = (y_target.sum(0) - lse2) * LN2
    entropy = ((lse2 - (w * rescale).sum(0) / total) * LN2) if with_entropy else logp.new_empty(0)
    return logp, lse2 * LN2, entropy


def token_chunk(V: int, element_size: int) -> int:
    """Tokens per backward chunk: CHUNK_BYTES of logits, a multiple of 128 when that large."""
    rows = max(1, CHUNK_BYTES // max(V * element_size, 1))
    return rows // 128 * 128 if rows >= 128 else rows


class _Matmuls:
    """The backward's three matmuls as cuBLAS computes them on half-precision inputs: fp32
    products and sums, one rounding to the output dtype at the end. On a GPU these are the
    cuBLAS calls; elsewhere the same numbers are made in torch from fp32 copies, which is how
    the CPU tests run the GPU's half-precision path."""

    # addmm(out_dtype=float32) summing into an fp32 `self`: torch releases whose CUDA addmm
    # lacks out_dtype, or wants `self` in the inputs' dtype, turn it off at the first call.
    fp32_out_addmm = True

    @staticmethod
    def logits(h, weight, bias):
        """(C, V) hidden_c @ weight^T (+ bias) in h's dtype."""
        if h.is_cuda:
            return torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
        z = h.float() @ weight.float().t()
        if bias is not None:
            z += bias.float()
        return z.to(h.dtype)

    @staticmethod
    def mm_into(a, b, out):
        """out = a @ b, out in a's dtype."""
        if a.is_cuda:
            torch.mm(a, b, out=out)
        else:
            out.copy_(a.float() @ b.float())

    @classmethod
    def add_mm_fp32(cls, acc, a, b):
        """acc += a @ b with acc fp32: the products are summed into acc in fp32, never rounded
        to a's dtype."""
        if a.dtype == torch.float32 or not a.is_cuda:
            acc.addmm_(a.float(), b.float())
            return
        if cls.fp32_out_addmm:
            try:
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                return
            except (TypeError, RuntimeError) as err:  # raised by the argument checks, before any launch
                cls.fp32_out_addmm = False
                logger.warning("r1vl_kernels: addmm(out_dtype=float32) into an fp32 sum is unavailable (%s); "
                               "dweight adds each chunk's product rounded once to %s, in vocabulary slices",
                               err, a.dtype)
        # Each chunk's product rounded once (not the running sum), in slices of 8192 rows so
        # that the temporary stays small.
        for v0 in range(0, acc.shape[0], 8192):
            acc[v0:v0 + 8192] += a[v0:v0 + 8192] @ b


def grad_from_hidden(hidden, weight, bias, target_ids, lse, dlogp, grad_out, temperature: float):
    """(dhidden (N, H) in hidden's dtype, dweight (V, H) fp32, dbias (V,) fp32 or None).
    lse, the forward's, is not used: each chunk's softmax takes its own (module docstring),
    as do the chunks and their memory bound."""
    N, H = hidden.shape
    V = weight.shape[0]
    dhidden = torch.zeros_like(hidden)
    dweight = torch.zeros(V, H, dtype=torch.float32, device=hidden.device)
    dbias = torch.zeros(V, dtype=torch.float32, device=hidden.device) if bias is not None else None
    active = (dlogp != 0).nonzero().squeeze(1)  # host sync: the tokens with a gradient
    n_active = active.shape[0]
    if n_active == 0:
        return dhidden, dweight, dbias
    if n_active < N:
        hidden, target_ids, dlogp = (x.index_select(0, active) for x in (hidden, target_ids, dlogp))
    grad_out = grad_out.to(torch.float32)
    chunk = token_chunk(V, hidden.element_size())
    dh = dhidden if n_active == N else hidden.new_empty(n_active, H)
    for c0 in range(0, n_active, chunk):
        c1 = min(c0 + chunk, n_active)
        h = hidden[c0:c1]
        logits = _Matmuls.logits(h, weight, bias)
        logprob_bwd(logits, target_ids[c0:c1], None, dlogp[c0:c1], grad_out, None, None, temperature,
                    out=logits)  # dlogits, in place; lse from each row
        _Matmuls.mm_into(logits, weight, dh[c0:c1])
        _Matmuls.add_mm_fp32(dweight, logits.t(), h)
        if dbias is not None:
            dbias += logits.sum(0, dtype=torch.float32)
    if n_active < N:
        dhidden.index_copy_(0, active, dh)
    return dhidden, dweight, dbias


# ----------------------------------------------------------------------------- custom ops and autograd


def _hidden_sweeps(impl: str):
    """(logprob_fwd_from_hidden, grad_from_hidden) of an implementation: the launchers above
    ("triton") or the torch reference's ("torch"), with the same contracts."""
    if impl == "torch":
        return reference.logprob_fwd_from_hidden, reference.grad_from_hidden
    return logprob_fwd_from_hidden, grad_from_hidden


@torch.library.custom_op(f"{LIBRARY}::token_logprobs_from_hidden", mutates_args=())
def token_logprobs_from_hidden_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                  target_ids: Tensor, temperature: float, with_entropy: bool,
                                  impl: str) -> tuple[Tensor, Tensor]:
    """(N,) fp32 log-probs and entropies (empty unless with_entropy) of the target tokens."""
    logp, _, entropy = _hidden_sweeps(impl)[0](hidden, weight, bias, target_ids, temperature, with_entropy)
    return logp, entropy


@token_logprobs_from_hidden_op.register_fake
def _(hidden, weight, bias, target_ids, temperature, with_entropy, impl):
    n = target_ids.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n if with_entropy else 0, dtype=torch.float32)


def grpo_loss_from_hidden_fwd(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target_ids: Tensor, cu_seqlens: Tensor,
    advantages: Tensor, old_logp: Optional[Tensor], ref_logp: Optional[Tensor],
    policy_weight: Optional[Tensor], sampling_logp: Optional[Tensor],
    vespo_log_offset: Optional[Tensor], temperature: float,
    beta: float, eps_low: float, eps_high: float, delta: Optional[float], inv_norm: float,
    per_seq_mean: bool, seq_level: bool, policy: str, sapo_tau_pos: float, sapo_tau_neg: float,
    off_policy_threshold: Optional[float], bias_correction_kl: bool, vespo_k_pos: float,
    vespo_lambda_pos: float, vespo_k_neg: float, vespo_lambda_neg: float, with_entropy: bool, impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The outputs of logits.grpo_loss_fwd, from hidden (N, H) and weight (V, H)."""
    cfg = terms_config(locals())  # first statement: locals() holds exactly the arguments
    logp, lse, entropy = _hidden_sweeps(impl)[0](hidden, weight, bias, target_ids, temperature, with_entropy)
    return loss_terms(impl, logp, lse, entropy, old_logp, ref_logp, policy_weight, sampling_logp,
                      vespo_log_offset, advantages, cu_seqlens, cfg)


grpo_loss_from_hidden_fwd_op = torch.library.custom_op(
    f"{LIBRARY}::grpo_loss_from_hidden_fwd", mutates_args=())(grpo_loss_from_hidden_fwd)


@grpo_loss_from_hidden_fwd_op.register_fake
def _(*args, **kwargs):
    x = named_inputs(grpo_loss_from_hidden_fwd, args, kwargs)
    return fake_loss_outputs(x["hidden"], x["target_ids"].shape[0], x["ref_logp"] is not None, x["with_entropy"])


@torch.library.custom_op(f"{LIBRARY}::grpo_loss_from_hidden_bwd", mutates_args=())
def grpo_loss_from_hidden_bwd_op(grad_loss: Tensor, hidden: Tensor, weight: Tensor,
                                 bias: Optional[Tensor], target_ids: Tensor, lse: Tensor,
                                 dlogp: Tensor, temperature: float,
                                 impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """dhidden (N, H), dweight (V, H) in their inputs' dtypes, dbias (V,) (empty without
    bias). Accumulated in fp32, cast at the end."""
    dhidden, dweight, dbias = _hidden_sweeps(impl)[1](hidden, weight, bias, target_ids, lse, dlogp, grad_loss,
                                                      temperature)
    dbias = dbias.to(bias.dtype) if bias is not None else hidden.new_empty(0)
    return dhidden.to(hidden.dtype), dweight.to(weight.dtype), dbias


@grpo_loss_from_hidden_bwd_op.register_fake
def _(grad_loss, hidden, weight, bias, target_ids, lse, dlogp, temperature, impl):
    return torch.empty_like(hidden), torch.empty_like(weight), (
        torch.empty_like(bias) if bias is not None else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    x = named_inputs(grpo_loss_from_hidden_fwd, inputs)
    _, _, lse, dlogp, *_ = output
    ctx.save_for_backward(x["hidden"], x["weight"], x["bias"], x["target_ids"], lse, dlogp)
    ctx.temperature, ctx.impl = x["temperature"], x["impl"]


def _backward(ctx, grad_loss, *_unused_grads):
    hidden, weight, bias, target_ids, lse, dlogp = ctx.saved_tensors
    dhidden, dweight, dbias = op("grpo_loss_from_hidden_bwd")(
        grad_loss, hidden, weight, bias, target_ids, lse, dlogp, ctx.temperature, ctx.impl)
    return input_grads(grpo_loss_from_hidden_fwd, hidden=dhidden, weight=dweight,
                       bias=dbias if bias is not None else None)


grpo_loss_from_hidden_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public


def token_logprobs_from_hidden(hidden: Tensor, weight: Tensor, target_ids: Tensor,
                               bias: Optional[Tensor] = None, temperature: float = 1.0,
                               return_entropy: bool = False, impl: Optional[str] = None):
    """log softmax((hidden @ weight^T + bias) / T)[target] per token, fp32, without gradient:
    old-policy and reference log-probs.

    hidden: (..., H) fp32/bf16/fp16; weight: (V, H) and bias (V,) of the same dtype;
    target_ids: (...) integer in [0, V). Returns logp (...) fp32, or (logp, entropy).
    """
    options.check_lm_head(hidden, weight, bias)
    lead = hidden.shape[:-1]
    target = options.check_ids(target_ids, lead, hidden.device).reshape(-1)
    options.check_temperature(temperature)
    impl = options.resolve_impl(impl, hidden.device)
    options.device_checks(options.id_range_checks(target, weight.shape[0]), {})
    with torch.no_grad():
        logp, entropy = op("token_logprobs_from_hidden")(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias, target, float(temperature), return_entropy, impl)
    logp = logp.view(lead)
    return (logp, entropy.view(lead)) if return_entropy else logp


def grpo_loss_from_hidden(
    hidden: Tensor, weight: Tensor, target_ids: Tensor, cu_seqlens: Optional[Tensor] = None,
    advantages: Optional[Tensor] = None, old_logp: Optional[Tensor] = None,
    ref_logp: Optional[Tensor] = None, *, bias: Optional[Tensor] = None,
    completion_mask: Optional[Tensor] = None, rewards: Optional[Tensor] = None,
    group_size: Optional[int] = None, scale_rewards: str = "group", temperature: float = 1.0,
    beta: float = 0.0, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
    delta: Optional[float] = None, loss_type: str = "grpo", importance_sampling_level: str = "token",
    max_completion_length: Optional[int] = None, num_items_in_batch: Optional[float] = None,
    policy_weight: Optional[Tensor] = None, off_policy_threshold: Optional[float] = None,
    sampling_logp: Optional[Tensor] = None, bias_correction_kl: bool = False,
    sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0, vespo_log_offset: Optional[Tensor] = None,
    return_entropy: bool = False, impl: Optional[str] = None,
) -> GRPOLossOutput:
    """grpo_loss (same semantics, options and output: loss types, policy_weight, the
    off-policy mask, bias_correction_kl) with logits = hidden @ weight^T + bias.

    hidden      (N, H) packed, or (B, L, H) padded with completion_mask (B, L): the final
                hidden states at the completion positions; fp32 / bf16 / fp16
    weight      (V, H) the lm_head weight, same dtype (a plain tensor: under ZeRO-3 gather it
                first, e.g. inside deepspeed.zero.GatheredParameters)
    bias        (V,) or None
    out.loss is differentiable with respect to hidden, weight and bias; their gradients are
    accumulated in fp32 ((N, H) and (V, H) buffers) and cast to their dtype.

    Passes: one forward pass over hidden x weight (online logsumexp, target logit, entropy)
    and one backward pass (recomputed logit tiles, then dhidden and dweight), for every loss
    type and for token- and sequence-level importance sampling alike. On CPU the eager path
    works in token x vocabulary chunks and never holds N x V either.
    """
    options.check_lm_head(hidden, weight, bias)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (N, H) packed or (B, L, H) padded, got shape {tuple(hidden.shape)}")
    options.check_hyperparameters(temperature, epsilon_low, epsilon_high, delta, beta, ref_logp, loss_type,
                                  importance_sampling_level)
    options.check_policy_options(loss_type, epsilon_high, sapo_temperature_pos, sapo_temperature_neg,
                                 off_policy_threshold, sampling_logp)
    setup = options.prepare_loss(
        "hidden", hidden.shape[:-1], weight.shape[0], hidden.device, target_ids, cu_seqlens,
        completion_mask, advantages, old_logp, ref_logp, rewards=rewards, group_size=group_size,
        scale_rewards=scale_rewards, loss_type=loss_type, max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch, impl=impl, policy_weight=policy_weight,
        sampling_logp=sampling_logp)
    rows = hidden
    if setup.flat_idx is not None:  # padded: gather the completion rows (N x H, small next to N x V)
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, setup.flat_idx)
    loss, logp, _, _, kl, entropy, low, high = op("grpo_loss_from_hidden_fwd")(
        hidden=rows, weight=weight, bias=bias, target_ids=setup.target, temperature=float(temperature),
        with_entropy=return_entropy,
        **options.epilogue_arguments(
            setup, loss_type, importance_sampling_level, beta, epsilon_low, epsilon_high, delta, off_policy_threshold,
            bias_correction_kl, sapo_temperature_pos, sapo_temperature_neg,
            (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg), vespo_log_offset))
    return options.make_output(setup, loss, logp, kl, entropy, low, high, return_entropy)
