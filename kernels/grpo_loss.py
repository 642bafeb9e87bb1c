"""Public API: the fused GRPO loss, per-token log-probs and group-relative advantages.

Packed layout (the native one): rows are the completion tokens of S sequences,
concatenated; cu_seqlens (S+1,) int32 starts at 0 and ends at N. Padded layout (what TRL
and verl hold): logits (B, L, V) with a (B, L) completion mask; it gives the same results.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import _checks
from .ops import op

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IS_LEVELS = ("token", "sequence")


@dataclass
class GRPOLossOutput:
    """What grpo_loss returns. Token-shaped fields are (N,) packed or (B, L) padded (zero
    where the mask is 0); everything but `loss` is detached."""
    loss: Tensor                # () fp32, differentiable with respect to logits
    logp: Tensor                # (N,) | (B, L) fp32: log softmax(logits / T)[target]
    kl: Optional[Tensor]        # (N,) | (B, L) fp32 k3 KL to the reference; None without ref_logp
    advantages: Tensor          # (S,) fp32, given or computed from rewards
    clip_low_frac: Tensor       # () fp32: share of tokens with ratio < 1 - eps_low and A < 0
    clip_high_frac: Tensor      # () fp32: share of tokens with ratio > 1 + eps_high and A > 0
    entropy: Optional[Tensor]   # (N,) | (B, L) fp32 entropy of softmax(logits / T), if asked


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group",
                     eps: float = 1e-4, impl: Optional[str] = None) -> Tensor:
    """Group-relative advantages, TRL's convention.

    rewards: (S,) float, sequences ordered group by group (G = group_size consecutive
    completions of one prompt). A = r - mean_G(r), divided by (std + eps) where std is the
    unbiased std of the group ("group"), of the whole batch ("batch"), or not at all
    ("none", Dr. GRPO). Returns (S,) fp32, no gradient.
    """
    if not isinstance(rewards, Tensor) or rewards.dim() != 1 or not rewards.dtype.is_floating_point:
        raise ValueError("rewards must be a 1-D floating-point tensor (S,)")
    _checks.check_group("S", rewards.shape[0], group_size, scale_rewards)
    impl = _checks.resolve_impl(impl, rewards.device)
    with torch.no_grad():
        return op("group_advantages")(rewards.detach().float().contiguous(), group_size, scale_rewards, float(eps), impl)


def token_logprobs(logits: Tensor, target_ids: Tensor, temperature: float = 1.0,
                   return_entropy: bool = False, impl: Optional[str] = None):
    """log softmax(logits / T)[target] per token, in fp32, without gradient.

    logits: (..., V) fp32/bf16/fp16 with unit stride along V (strided views such as
    logits[:, :-1] of a (B, L+1, V) tensor are read in place). target_ids: (...) integer.
    Returns logp (...) fp32, or (logp, entropy) with return_entropy.
    """
    _checks.check_logits(logits)
    lead, V = logits.shape[:-1], logits.shape[-1]
    target = _checks.check_ids(target_ids, lead, logits.device).reshape(-1)
    _check_temperature(temperature)
    impl = _checks.resolve_impl(impl, logits.device)
    rows, flat_idx = _as_rows(logits)
    _checks.device_checks(_id_range_checks(target, V), {})
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
    return_entropy: bool = False, inplace_backward: bool = False, impl: Optional[str] = None,
) -> GRPOLossOutput:
    """The GRPO loss from logits: one sweep of the vocabulary forward, one backward.

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
    (GSPO) exp(mean over the sequence of logp - old_logp); clipped = clamp(ratio,
    1 - epsilon_low, 1 + epsilon_high); ratio capped at delta if given (two-sided clipping);
    loss_t = -min(ratio A, clipped A) + beta * (exp(ref - logp) - (ref - logp) - 1).
    Reduction (TRL's loss_type): "grpo" mean over sequences of each sequence's token mean;
    "bnpo" sum / N; "dr_grpo" sum / (S * max_completion_length) (default: the longest
    sequence, or L in the padded layout); "dapo" sum / num_items_in_batch (default N).

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
    _checks.check_logits(logits)
    _checks.check_choice("loss_type", loss_type, LOSS_TYPES)
    _checks.check_choice("importance_sampling_level", importance_sampling_level, IS_LEVELS)
    _check_temperature(temperature)
    for name, eps in (("epsilon_low", epsilon_low), ("epsilon_high", epsilon_high)):
        if not eps >= 0:
            raise ValueError(f"{name} must be >= 0, got {eps}")
    if delta is not None and not delta > 0:
        raise ValueError(f"delta must be None or > 0, got {delta}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp (reference log-probs)")
    device, V = logits.device, logits.shape[-1]
    impl = _checks.resolve_impl(impl, device)

    if logits.dim() == 3:
        if cu_seqlens is not None:
            raise ValueError("padded logits (B, L, V) take completion_mask, not cu_seqlens")
        batch = _PaddedBatch(logits, target_ids, completion_mask)
        target, flat_idx, cu = batch.target, batch.flat_idx, batch.cu_seqlens
        token_shape, S, N = (logits.shape[0], logits.shape[1]), logits.shape[0], batch.n_tokens
        old_logp = batch.pack("old_logp", old_logp)
        ref_logp = batch.pack("ref_logp", ref_logp)
        checks, longest = batch.checks, logits.shape[1]
    elif logits.dim() == 2:
        if completion_mask is not None:
            raise ValueError("packed logits (N, V) take cu_seqlens, not completion_mask")
        N = logits.shape[0]
        target, flat_idx, token_shape = _checks.check_ids(target_ids, (N,), device), None, (N,)
        cu, S = _check_cu_seqlens(cu_seqlens, device)
        old_logp = _checks.check_float_vector("old_logp", old_logp, (N,), device)
        ref_logp = _checks.check_float_vector("ref_logp", ref_logp, (N,), device)
        checks, longest = _cu_seqlens_checks(cu, N), None
    else:
        raise ValueError(f"logits must be (N, V) packed or (B, L, V) padded, got shape {tuple(logits.shape)}")
    checks.update(_id_range_checks(target, V))

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
    if loss_type == "grpo":
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

    if inplace_backward and logits.dim() == 3 and not logits.is_contiguous():
        raise ValueError("inplace_backward needs contiguous padded logits (B, L, V)")
    loss, logp, _, _, kl, entropy, low, high = op("grpo_loss_fwd")(
        logits, target, flat_idx, cu, advantages, old_logp, ref_logp, float(temperature),
        float(beta), float(epsilon_low), float(epsilon_high),
        None if delta is None else float(delta), inv_norm, loss_type == "grpo",
        importance_sampling_level == "sequence", return_entropy, inplace_backward, impl)

    def unpack(x):
        x = x.detach()
        if flat_idx is None:
            return x
        return torch.zeros(token_shape[0] * token_shape[1], dtype=x.dtype, device=device).index_copy_(
            0, flat_idx, x).view(token_shape)

    return GRPOLossOutput(
        loss=loss, logp=unpack(logp), kl=unpack(kl) if ref_logp is not None else None,
        advantages=advantages.detach(), clip_low_frac=low.detach(), clip_high_frac=high.detach(),
        entropy=unpack(entropy) if return_entropy else None)


# ----------------------------------------------------------------------------- helpers


class _PaddedBatch:
    """A padded (B, L, V) batch seen as packed tokens: the masked positions in row order."""

    def __init__(self, logits: Tensor, target_ids, completion_mask):
        B, L = logits.shape[:2]
        device = logits.device
        self.target_full = _checks.check_ids(target_ids, (B, L), device)
        if completion_mask is None:
            mask = torch.ones(B, L, dtype=torch.bool, device=device)
            self.checks = {}
        else:
            if not isinstance(completion_mask, Tensor) or tuple(completion_mask.shape) != (B, L):
                raise ValueError(f"completion_mask must be a tensor of shape {(B, L)} to match logits")
            _checks.check_device("completion_mask", completion_mask, device)
            mask = completion_mask != 0
            self.checks = {"completion_mask must hold only 0 and 1":
                           ((completion_mask == 0) | (completion_mask == 1)).all()}
        self.token_shape = (B, L)
        self.flat_idx = mask.reshape(-1).nonzero().squeeze(1)  # host sync: the token count
        self.n_tokens = self.flat_idx.shape[0]
        self.target = self.target_full.reshape(-1)[self.flat_idx]
        self.cu_seqlens = torch.zeros(B + 1, dtype=torch.int32, device=device)
        self.cu_seqlens[1:] = mask.sum(1).cumsum(0)

    def pack(self, name: str, x: Optional[Tensor]) -> Optional[Tensor]:
        x = _checks.check_float_vector(name, x, self.token_shape, self.flat_idx.device)
        return None if x is None else x.reshape(-1)[self.flat_idx].contiguous()


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


def _check_temperature(temperature) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_cu_seqlens(cu_seqlens, device):
    if not isinstance(cu_seqlens, Tensor):
        raise ValueError("packed logits (N, V) need cu_seqlens, an int32 tensor (S+1,)")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be 1-D (S+1,) with S >= 1, got shape {tuple(cu_seqlens.shape)}")
    _checks.check_device("cu_seqlens", cu_seqlens, device)
    return cu_seqlens.contiguous(), cu_seqlens.shape[0] - 1


def _cu_seqlens_checks(cu: Tensor, N: int) -> dict:
    return {
        "cu_seqlens must start at 0": cu[0] == 0,
        f"cu_seqlens must end at N={N}, the number of logits rows": cu[-1] == N,
        "cu_seqlens must be non-decreasing": (cu[1:] >= cu[:-1]).all(),
    }


def _id_range_checks(target: Tensor, V: int) -> dict:
    if target.numel() == 0:
        return {}
    return {f"target_ids must lie in [0, V={V})": (target.min() >= 0) & (target.max() < V)}
