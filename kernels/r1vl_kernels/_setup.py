"""What both loss entry points (from logits, from hidden states) do before their kernels:
check every argument, bring padded layouts to packed tokens, compute the advantages and the
normalizer of the loss type. One place, so the two entry points cannot drift apart."""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import _checks
from .ops import op

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
IS_LEVELS = ("token", "sequence")


@dataclass
class LossSetup:
    """Checked, packed inputs of the loss kernels."""
    target: Tensor                # (N,) int64
    flat_idx: Optional[Tensor]    # (N,) int64 position b * L + l of each token (padded), or None
    cu_seqlens: Tensor            # (S+1,) int32
    advantages: Tensor            # (S,) fp32
    old_logp: Optional[Tensor]    # (N,) fp32
    ref_logp: Optional[Tensor]    # (N,) fp32
    policy_weight: Optional[Tensor]  # (N,) fp32 weight of each token's policy term
    sampling_logp: Optional[Tensor]  # (N,) fp32 log-probs of the sampler (off-policy mask)
    token_shape: tuple            # (N,) packed or (B, L) padded: the shape of token outputs
    inv_norm: float               # the loss type's 1 / normalizer (grpo: 1 / S, per sequence mean)
    impl: str                     # "triton" | "torch"

    def unpack(self, x: Tensor) -> Tensor:
        """(N,) per-token values -> token_shape, zeros off the completion mask; detached."""
        x = x.detach()
        if self.flat_idx is None:
            return x
        B, L = self.token_shape
        return x.new_zeros(B * L).index_copy_(0, self.flat_idx, x).view(B, L)


def check_hyperparameters(temperature, epsilon_low, epsilon_high, delta, beta, ref_logp,
                          loss_type, importance_sampling_level) -> None:
    _checks.check_choice("loss_type", loss_type, LOSS_TYPES)
    _checks.check_choice("importance_sampling_level", importance_sampling_level, IS_LEVELS)
    check_temperature(temperature)
    for name, eps in (("epsilon_low", epsilon_low), ("epsilon_high", epsilon_high)):
        if not eps >= 0:
            raise ValueError(f"{name} must be >= 0, got {eps}")
    if delta is not None and not delta > 0:
        raise ValueError(f"delta must be None or > 0, got {delta}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp (reference log-probs)")


def check_temperature(temperature) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def prepare_loss(
    what: str, lead_shape: tuple, V: int, device, target_ids, cu_seqlens, completion_mask,
    advantages, old_logp, ref_logp, *, rewards, group_size, scale_rewards, loss_type,
    max_completion_length, num_items_in_batch, impl, policy_weight=None, sampling_logp=None,
) -> LossSetup:
    """what: "logits" or "hidden", for messages. lead_shape: (N,) packed or (B, L) padded."""
    impl = _checks.resolve_impl(impl, device)
    if len(lead_shape) == 2:
        if cu_seqlens is not None:
            raise ValueError(f"padded {what} (B, L, ...) take completion_mask, not cu_seqlens")
        batch = _PaddedBatch(what, lead_shape, device, target_ids, completion_mask)
        target, flat_idx, cu = batch.target, batch.flat_idx, batch.cu_seqlens
        S, N, checks, longest = lead_shape[0], batch.n_tokens, batch.checks, lead_shape[1]
        old_logp = batch.pack("old_logp", old_logp)
        ref_logp = batch.pack("ref_logp", ref_logp)
        policy_weight = batch.pack("policy_weight", policy_weight)
        sampling_logp = batch.pack("sampling_logp", sampling_logp)
    elif len(lead_shape) == 1:
        if completion_mask is not None:
            raise ValueError(f"packed {what} (N, ...) take cu_seqlens, not completion_mask")
        N = lead_shape[0]
        target, flat_idx = _checks.check_ids(target_ids, (N,), device), None
        cu, S = _check_cu_seqlens(what, cu_seqlens, device)
        old_logp = _checks.check_float_vector("old_logp", old_logp, (N,), device)
        ref_logp = _checks.check_float_vector("ref_logp", ref_logp, (N,), device)
        policy_weight = _checks.check_float_vector("policy_weight", policy_weight, (N,), device)
        sampling_logp = _checks.check_float_vector("sampling_logp", sampling_logp, (N,), device)
        checks, longest = _cu_seqlens_checks(what, cu, N), None
    else:
        raise ValueError(f"{what} must be (N, ...) packed or (B, L, ...) padded, got leading shape {tuple(lead_shape)}")
    checks.update(id_range_checks(target, V))

    if (advantages is None) == (rewards is None):
        raise ValueError("give exactly one of advantages or rewards (with group_size)")
    if rewards is not None:
        if group_size is None:
            raise ValueError("rewards need group_size")
        _checks.check_float_vector("rewards", rewards, (S,), device)
        _checks.check_group("S", S, group_size, scale_rewards)
        advantages = op("group_advantages")(rewards.detach().float().contiguous(), group_size, scale_rewards, 1e-4, impl)
    else:
        if group_size is not None:
            raise ValueError("group_size is only used with rewards; advantages are already normalized")
        advantages = _checks.check_float_vector("advantages", advantages, (S,), device).contiguous()

    wanted = {}
    if loss_type == "dr_grpo" and max_completion_length is None and longest is None:
        wanted["longest"] = (cu[1:] - cu[:-1]).max()
    host = _checks.device_checks(checks, wanted)
    if loss_type in ("grpo", "sapo", "luspo"):  # sapo: a mean per sequence; luspo: a sum
        inv_norm = 1.0 / S
    elif loss_type == "bnpo":
        inv_norm = 1.0 / max(N, 1)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            if longest is None and "longest" not in host:
                raise ValueError("under torch.compile, dr_grpo needs max_completion_length")
            max_completion_length = longest if longest is not None else int(host["longest"])
        if not max_completion_length >= 1:
            raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
        inv_norm = 1.0 / (S * max_completion_length)
    else:
        num_items = float(max(N, 1) if num_items_in_batch is None else num_items_in_batch)
        if not num_items > 0:
            raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch}")
        inv_norm = 1.0 / num_items
    return LossSetup(target=target, flat_idx=flat_idx, cu_seqlens=cu, advantages=advantages,
                     old_logp=old_logp, ref_logp=ref_logp, policy_weight=_contiguous(policy_weight),
                     sampling_logp=_contiguous(sampling_logp), token_shape=tuple(lead_shape),
                     inv_norm=inv_norm, impl=impl)


class _PaddedBatch:
    """A padded (B, L) batch seen as packed tokens: the masked positions in row order."""

    def __init__(self, what, lead_shape, device, target_ids, completion_mask):
        B, L = lead_shape
        target_full = _checks.check_ids(target_ids, (B, L), device)
        if completion_mask is None:
            mask = torch.ones(B, L, dtype=torch.bool, device=device)
            self.checks = {}
        else:
            if not isinstance(completion_mask, Tensor) or tuple(completion_mask.shape) != (B, L):
                raise ValueError(f"completion_mask must be a tensor of shape {(B, L)} to match {what}")
            _checks.check_device("completion_mask", completion_mask, device)
            mask = completion_mask != 0
            self.checks = {"completion_mask must hold only 0 and 1":
                           ((completion_mask == 0) | (completion_mask == 1)).all()}
        self.token_shape = (B, L)
        self.flat_idx = mask.reshape(-1).nonzero().squeeze(1)  # host sync: the token count
        self.n_tokens = self.flat_idx.shape[0]
        self.target = target_full.reshape(-1)[self.flat_idx]
        self.cu_seqlens = torch.zeros(B + 1, dtype=torch.int32, device=device)
        self.cu_seqlens[1:] = mask.sum(1).cumsum(0)

    def pack(self, name: str, x: Optional[Tensor]) -> Optional[Tensor]:
        x = _checks.check_float_vector(name, x, self.token_shape, self.flat_idx.device)
        return None if x is None else x.reshape(-1)[self.flat_idx].contiguous()


def _contiguous(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.contiguous()


def _check_cu_seqlens(what, cu_seqlens, device):
    if not isinstance(cu_seqlens, Tensor):
        raise ValueError(f"packed {what} (N, ...) need cu_seqlens, an int32 tensor (S+1,)")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be 1-D (S+1,) with S >= 1, got shape {tuple(cu_seqlens.shape)}")
    _checks.check_device("cu_seqlens", cu_seqlens, device)
    return cu_seqlens.contiguous(), cu_seqlens.shape[0] - 1


def _cu_seqlens_checks(what: str, cu: Tensor, N: int) -> dict:
    return {
        "cu_seqlens must start at 0": cu[0] == 0,
        f"cu_seqlens must end at N={N}, the number of {what} rows": cu[-1] == N,
        "cu_seqlens must be non-decreasing": (cu[1:] >= cu[:-1]).all(),
    }


def id_range_checks(target: Tensor, V: int) -> dict:
    if target.numel() == 0:
        return {}
    return {f"target_ids must lie in [0, V={V})": (target.min() >= 0) & (target.max() < V)}
