"""The token-level GRPO loss from logits in one sweep (Triton only), as a custom op.

ops.grpo_loss_fwd reads the logits in forward, and its backward reads them again and writes
dlogits: three passes over N x V. With token-level importance sampling a token's
dLoss/dlogp is known as soon as its logsumexp is, so _triton_vocab.logprob_fwd_bwd writes
its dlogits row in forward, reading the row a second time while it is still in L2: one
read from memory and one write. Backward only scales the saved dlogits by the upstream
gradient; when that is exactly 1 (loss.backward() on this loss) it hands them over as they
are (one scalar host sync; under torch.compile it always multiplies). Any other upstream
gradient rounds the gradient twice in the logits' dtype (stored, then scaled): up to one
ulp instead of half of one.

Memory: the dlogits buffer (logits' shape and dtype) exists from forward to backward
instead of during backward only. grpo_loss takes this path only when the logits need a
gradient, without inplace_backward (which writes over the logits in backward: the
sequence-level variant and the in-place option keep ops.grpo_loss_fwd's two sweeps).
"""
from typing import Optional

import torch
from torch import Tensor

from ._terms import TermsConfig
from .ops import LIBRARY, row_offsets, fake_loss_outputs, input_grads, loss_terms


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
    """The outputs of ops.grpo_loss_fwd (token level), then dLoss/dlogits for an upstream
    gradient of 1: a new tensor of logits' shape and dtype (zero rows off the mask)."""
    from . import _triton_grpo, _triton_vocab  # on first use: TRITON_INTERPRET is read then
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
    logp, lse, entropy, dlogp = _triton_vocab.logprob_fwd_bwd(
        rows, target_ids, row_off, tok_of_row, old_logp, ref_logp, adv_tok, weight_tok, temperature,
        with_entropy, eps_low=eps_low, eps_high=eps_high, delta=delta, beta=beta, out=out2d)
    # The clipped policy term only (grpo_loss sends the other options to the two-sweep op).
    cfg = TermsConfig(eps_low=eps_low, eps_high=eps_high, delta=delta, beta=beta, inv_norm=inv_norm,
                      per_seq_mean=per_seq_mean, seq_level=False)
    outputs = loss_terms(_triton_grpo, logp, lse, entropy, old_logp, ref_logp, None, None, None, advantages,
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


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[-1])


def _backward(ctx, grad_loss, *_unused_grads):
    dlogits, = ctx.saved_tensors
    if not torch.compiler.is_compiling() and bool(grad_loss == 1):
        scaled = dlogits
    else:
        scaled = dlogits * grad_loss.to(dlogits.dtype)
    return input_grads(grpo_loss_one_sweep, logits=scaled)


grpo_loss_one_sweep_op.register_autograd(_backward, setup_context=_setup_context)
