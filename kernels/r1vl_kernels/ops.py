"""torch.library custom ops for the GRPO loss, with autograd and fake (meta) kernels.

Custom ops keep the kernels opaque to torch.compile (it does not trace into the launchers)
and give autograd a single node: forward = one vocabulary sweep + the O(N) loss terms,
backward = one more vocabulary sweep writing dlogits.

Each op takes `impl` ("triton" or "torch"); the public functions in grpo_loss.py resolve it.
Rows of the logits are addressed either directly (logits (N, V), row t = token t) or, for
padded (B, L, V) layouts, through `flat_idx` (N,) int64: the position b * L + l of each
token, so strided views such as logits[:, :-1] are read in place without a copy.
"""
import dataclasses
import inspect
import types
from typing import Optional

import torch
from torch import Tensor

from . import _torch_impl
from ._terms import TermsConfig

LIBRARY = "r1vl_kernels"


def op(name: str):
    """The registered operator `r1vl_kernels::name`, looked up at call time.

    Calls go through torch.ops rather than the CustomOpDef objects below: with torch 2.13,
    calling grpo_loss_fwd through its CustomOpDef crashed in the dispatcher's argument
    parsing (std::bad_alloc, vector::reserve) in about one process in three once
    transformers had been imported afterwards; the same call through torch.ops never did in
    the same reproduction (tests/kernels/test_op_calls.py). The cause is not understood.
    """
    return getattr(getattr(torch.ops, LIBRARY), name).default


def _backend(impl: str):
    if impl == "torch":
        return _torch_impl
    # Imported on first use: triton.jit reads TRITON_INTERPRET when the kernels are defined.
    from . import _triton_grpo, _triton_vocab
    return types.SimpleNamespace(
        logprob_fwd=_triton_vocab.logprob_fwd, logprob_bwd=_triton_vocab.logprob_bwd,
        group_advantages=_triton_grpo.group_advantages, grpo_terms=_triton_grpo.grpo_terms)


def row_offsets(logits: Tensor, flat_idx: Optional[Tensor]) -> Optional[Tensor]:
    """Element offset of each token's row: (N,) int64, or None for direct addressing."""
    if flat_idx is None:
        return None
    if logits.dim() == 2:
        return flat_idx * logits.stride(0)
    L = logits.shape[1]
    return (flat_idx // L) * logits.stride(0) + (flat_idx % L) * logits.stride(1)


# ----------------------------------------------------------------------------- token log-probs


@torch.library.custom_op(f"{LIBRARY}::token_logprobs", mutates_args=())
def token_logprobs_op(logits: Tensor, target_ids: Tensor, flat_idx: Optional[Tensor],
                      temperature: float, with_entropy: bool, impl: str) -> tuple[Tensor, Tensor]:
    """(N,) fp32 log-probs and entropies (empty unless with_entropy) of the target tokens."""
    logp, _, entropy = _backend(impl).logprob_fwd(
        logits, target_ids, row_offsets(logits, flat_idx), temperature, with_entropy)
    return logp, entropy


@token_logprobs_op.register_fake
def _(logits, target_ids, flat_idx, temperature, with_entropy, impl):
    n = target_ids.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n if with_entropy else 0, dtype=torch.float32)


# ----------------------------------------------------------------------------- advantages


@torch.library.custom_op(f"{LIBRARY}::group_advantages", mutates_args=())
def group_advantages_op(rewards: Tensor, group_size: int, scale_rewards: str, eps: float,
                        impl: str) -> Tensor:
    """(S,) fp32 group-normalized advantages of (S,) fp32 rewards."""
    return _backend(impl).group_advantages(rewards, group_size, scale_rewards, eps)


@group_advantages_op.register_fake
def _(rewards, group_size, scale_rewards, eps, impl):
    return torch.empty_like(rewards)


# ----------------------------------------------------------------------------- GRPO loss


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
    bias_correction_kl) are those of _terms.TermsConfig. inplace_backward is read by the
    autograd rule only."""
    cfg = terms_config(locals())  # first statement: locals() holds exactly the arguments
    backend = _backend(impl)
    logp, lse, entropy = backend.logprob_fwd(
        logits, target_ids, row_offsets(logits, flat_idx), temperature, with_entropy)
    return loss_terms(backend, logp, lse, entropy, old_logp, ref_logp, policy_weight, sampling_logp,
                      vespo_log_offset, advantages, cu_seqlens, cfg)


grpo_loss_fwd_op = torch.library.custom_op(f"{LIBRARY}::grpo_loss_fwd", mutates_args=())(grpo_loss_fwd)


def terms_config(op_arguments: dict) -> TermsConfig:
    """The epilogue's options from a forward op's arguments (its parameters carry the names
    of TermsConfig's fields)."""
    return TermsConfig(**{f.name: op_arguments[f.name] for f in dataclasses.fields(TermsConfig)})


def loss_terms(backend, logp, lse, entropy, old_logp, ref_logp, policy_weight, sampling_logp,
               vespo_log_offset, advantages, cu_seqlens, cfg: TermsConfig):
    """The O(N) epilogue of a forward op, after the vocabulary pass gave logp, lse, entropy:
    the outputs of grpo_loss_fwd (see there)."""
    dlogp, kl, seq_loss, seq_low, seq_high = backend.grpo_terms(
        logp, old_logp, ref_logp, advantages, cu_seqlens, policy_weight, sampling_logp, vespo_log_offset, cfg)
    n_tokens = max(logp.shape[0], 1)
    return (seq_loss.sum(), logp, lse, dlogp, kl, entropy,
            seq_low.sum() / n_tokens, seq_high.sum() / n_tokens)


def fake_loss_outputs(like: Tensor, n: int, with_kl: bool, with_entropy: bool):
    """Empty outputs of a forward op's shapes, for tracing (torch.compile)."""
    def vec(size):
        return like.new_empty(size, dtype=torch.float32)

    return (vec(()), vec(n), vec(n), vec(n), vec(n if with_kl else 0), vec(n if with_entropy else 0),
            vec(()), vec(()))


def named_inputs(fn, args, kwargs=None) -> dict:
    """An op's inputs by parameter name, so that the fake kernels and autograd rules never
    depend on the position of an argument."""
    return inspect.signature(fn).bind(*args, **(kwargs or {})).arguments


def input_grads(fn, **grads) -> tuple:
    """The tuple an autograd rule returns: the given gradients by name, None for the rest."""
    names = list(inspect.signature(fn).parameters)
    unknown = set(grads) - set(names)
    if unknown:
        raise TypeError(f"{fn.__name__} has no inputs named {sorted(unknown)}")
    return tuple(grads.get(name) for name in names)


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
    _backend(impl).logprob_bwd(logits, target_ids, lse, dlogp, grad_loss, row_off, tok_of_row,
                               temperature, out2d)


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


def _setup_context(ctx, inputs, output):
    x = named_inputs(grpo_loss_fwd, inputs)
    _, _, lse, dlogp, *_ = output
    ctx.save_for_backward(x["logits"], x["target_ids"], x["flat_idx"], lse, dlogp)
    ctx.temperature, ctx.inplace, ctx.impl = x["temperature"], x["inplace_backward"], x["impl"]


def _backward(ctx, grad_loss, *_unused_grads):
    logits, target_ids, flat_idx, lse, dlogp = ctx.saved_tensors
    args = (grad_loss, logits, target_ids, flat_idx, lse, dlogp, ctx.temperature, ctx.impl)
    if ctx.inplace:
        op("grpo_loss_bwd_inplace")(*args)
        dlogits = logits
    else:
        dlogits = op("grpo_loss_bwd")(*args)
    return input_grads(grpo_loss_fwd, logits=dlogits)


grpo_loss_fwd_op.register_autograd(_backward, setup_context=_setup_context)
