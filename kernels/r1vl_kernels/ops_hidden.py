"""torch.library custom ops for the loss from hidden states (lm_head fused), with autograd
and fake kernels. Same structure as ops.py: one forward op (one pass over hidden x weight,
then the O(N) loss terms) and one backward op (one more pass: dhidden, dweight, dbias)."""
import types
from typing import Optional

import torch
from torch import Tensor

from . import _torch_hidden, _torch_impl
from .ops import LIBRARY, fake_loss_outputs, input_grads, loss_terms, named_inputs, op, terms_config


def _backend(impl: str):
    if impl == "torch":
        return types.SimpleNamespace(logprob_fwd=_torch_hidden.logprob_fwd, grad=_torch_hidden.grad_from_hidden,
                                     grpo_terms=_torch_impl.grpo_terms)
    from . import _triton_grpo, _triton_hidden  # on first use: TRITON_INTERPRET is read then
    return types.SimpleNamespace(logprob_fwd=_triton_hidden.logprob_fwd, grad=_triton_hidden.grad_from_hidden,
                                 grpo_terms=_triton_grpo.grpo_terms)


@torch.library.custom_op(f"{LIBRARY}::token_logprobs_from_hidden", mutates_args=())
def token_logprobs_from_hidden_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                  target_ids: Tensor, temperature: float, with_entropy: bool,
                                  impl: str) -> tuple[Tensor, Tensor]:
    """(N,) fp32 log-probs and entropies (empty unless with_entropy) of the target tokens."""
    logp, _, entropy = _backend(impl).logprob_fwd(hidden, weight, bias, target_ids, temperature, with_entropy)
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
    """The outputs of ops.grpo_loss_fwd, from hidden (N, H) and weight (V, H)."""
    cfg = terms_config(locals())  # first statement: locals() holds exactly the arguments
    backend = _backend(impl)
    logp, lse, entropy = backend.logprob_fwd(hidden, weight, bias, target_ids, temperature, with_entropy)
    return loss_terms(backend, logp, lse, entropy, old_logp, ref_logp, policy_weight, sampling_logp,
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
    dhidden, dweight, dbias = _backend(impl).grad(hidden, weight, bias, target_ids, lse, dlogp, grad_loss,
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
