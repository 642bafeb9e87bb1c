"""The option and validation layer: every argument of the public functions checked, with a
ValueError naming it, before any kernel runs (an out-of-range id would otherwise be an
illegal memory access later); padded layouts brought to packed tokens; the advantages and the
normalizer of the loss type computed; the options of the O(N) epilogue gathered
(TermsConfig); the public output assembled (GRPOLossOutput). One place, so the two loss
entry points (logits.grpo_loss, hidden.grpo_loss_from_hidden) cannot drift apart.

Plain torch, no triton: the torch reference (reference.py) imports it too.
"""
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .registry import op

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
IS_LEVELS = ("token", "sequence")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- the epilogue's options


# The policy term of each loss type (TRL's GRPOTrainer._compute_loss, trl 1.16):
#   "clip"  -min(r A, clamp(r, 1 - eps_low, 1 + eps_high) A), r capped at delta if given
#   "cispo" -sg(min(r, eps_high)) A logp  (sg: no gradient through the ratio)
#   "sapo"  -sigmoid(tau (r - 1)) 4 / tau A, tau = tau_pos if A > 0 else tau_neg
#   "vespo" -sg(phi_s) A logp, phi_s = exp(lam + k log w - lam w) of the sequence's
#           w = exp(clamp(sum_t clamp(logp - old, -20, 20) + offset_s, log 1e-8, 20)),
#           (k, lam) = (k_pos, lambda_pos) if A >= 0 else (k_neg, lambda_neg)
POLICIES = ("clip", "cispo", "sapo", "vespo")
POLICY_OF_LOSS = {"grpo": "clip", "bnpo": "clip", "dr_grpo": "clip", "dapo": "clip", "luspo": "clip",
                  "cispo": "cispo", "sapo": "sapo", "vespo": "vespo"}
VESPO_LOG_W_MIN = -18.420680743952367  # log(1e-8), TRL's lower clamp of vespo's log-weights
PER_SEQ_MEAN_LOSSES = ("grpo", "sapo")  # each sequence's token mean, then the mean over sequences


@dataclass(frozen=True)
class TermsConfig:
    """Scalars of the epilogue. The reduction weight of a token of sequence s is
    inv_norm / n_s with per_seq_mean (grpo, sapo), else inv_norm."""
    eps_low: float
    eps_high: float
    delta: Optional[float]        # two-sided clipping cap of the ratio (clip policy only)
    beta: float                   # KL coefficient
    inv_norm: float
    per_seq_mean: bool
    seq_level: bool               # sequence-level importance ratio (GSPO)
    policy: str = "clip"          # one of POLICIES
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    off_policy_threshold: Optional[float] = None  # off-policy sequence mask (OPSM) if given
    bias_correction_kl: bool = False              # KL term multiplied by the importance ratio
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0


# ----------------------------------------------------------------------------- which implementation


def interpreting() -> bool:
    """TRITON_INTERPRET is set: Triton kernels run on CPU through the interpreter. Read at
    call time; triton.jit reads it once, when r1vl_kernels is imported (the kernel modules
    logits, hidden and terms define their kernels at import)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_impl(impl: Optional[str], device: torch.device) -> str:
    """None: Triton for CUDA tensors, eager torch on CPU unless TRITON_INTERPRET=1."""
    interpret = interpreting()
    if impl is None:
        return "triton" if device.type == "cuda" or interpret else "torch"
    if impl not in ("triton", "torch"):
        raise ValueError(f"impl must be None, 'triton' or 'torch', got {impl!r}")
    if impl == "triton" and device.type != "cuda" and not interpret:
        raise ValueError("impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 on CPU")
    return impl


# ----------------------------------------------------------------------------- argument checks


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_logits(logits) -> None:
    check_logits_like("logits", logits)


def check_ids(target_ids, shape, device) -> Tensor:
    """Integer ids of the given shape on device, returned as int64."""
    if not isinstance(target_ids, Tensor) or target_ids.dtype.is_floating_point or target_ids.dtype == torch.bool:
        raise ValueError("target_ids must be an integer tensor")
    if tuple(target_ids.shape) != tuple(shape):
        raise ValueError(f"target_ids must have shape {tuple(shape)} to match logits, got {tuple(target_ids.shape)}")
    check_device("target_ids", target_ids, device)
    return target_ids.long()


def check_float_vector(name: str, x, shape, device) -> Optional[Tensor]:
    """None stays None; otherwise a float tensor of the given shape, returned as fp32."""
    if x is None:
        return None
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    check_device(name, x, device)
    return x.detach().float()


def check_device(name: str, x: Tensor, device: torch.device) -> None:
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but logits are on {device}")


def check_group(name_s: str, S: int, group_size, scale_rewards: str) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if S % group_size:
        raise ValueError(f"group_size={group_size} does not divide the number of sequences {name_s}={S}")
    check_choice("scale_rewards", scale_rewards, ("group", "batch", "none"))
    if scale_rewards == "group" and group_size < 2:
        raise ValueError("scale_rewards='group' needs group_size >= 2 (the std of one reward is undefined)")
    if scale_rewards == "batch" and S < 2:
        raise ValueError("scale_rewards='batch' needs at least 2 rewards")


def device_checks(checks: dict[str, Tensor], values: dict[str, Tensor]) -> dict[str, float]:
    """Check conditions held in device tensors with one host sync for all of them.

    checks: message -> 0-dim bool tensor that must be True. values: name -> 0-dim tensor
    wanted on the host. Returns the values as floats. Skipped under torch.compile tracing,
    where no host sync may happen (the values are then not available: returns {}).
    """
    if torch.compiler.is_compiling() or not (checks or values):
        return {}
    keys = list(checks) + list(values)
    host = torch.stack([t.reshape(()).double() for t in list(checks.values()) + list(values.values())]).tolist()
    result = dict(zip(keys, host))
    for message in checks:
        if not result[message]:
            raise ValueError(message)
    return {name: result[name] for name in values}


def check_lm_head(hidden, weight, bias) -> None:
    """hidden (..., H), weight (V, H), bias (V,) or None: one float dtype, one device, unit
    stride along H (the kernels read rows of H contiguous values)."""
    check_logits_like("hidden", hidden)
    check_logits_like("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H), got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden has H={hidden.shape[-1]} but weight is (V, H) with H={weight.shape[1]}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    check_device("weight", weight, hidden.device)
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be a tensor of shape ({weight.shape[0]},) to match weight")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
        check_device("bias", bias, hidden.device)


def check_logits_like(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 2 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have at least 2 dimensions and a non-empty last one, got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dimension; call .contiguous() first")


def check_policy_options(loss_type: str, epsilon_high: float, sapo_temperature_pos: float,
                         sapo_temperature_neg: float, off_policy_threshold, sampling_logp) -> None:
    """The options of the policy term that check_hyperparameters does not cover."""
    if loss_type == "cispo" and not epsilon_high > 0:
        raise ValueError(f"loss_type='cispo' caps the ratio at epsilon_high, which must be > 0, got {epsilon_high}")
    for name, tau in (("sapo_temperature_pos", sapo_temperature_pos), ("sapo_temperature_neg", sapo_temperature_neg)):
        if not tau > 0:
            raise ValueError(f"{name} must be > 0, got {tau}")
    if off_policy_threshold is not None and not isinstance(off_policy_threshold, (int, float)):
        raise ValueError(f"off_policy_threshold must be None or a float, got {off_policy_threshold!r}")
    if sampling_logp is not None and off_policy_threshold is None:
        raise ValueError("sampling_logp is only read by the off-policy mask: give off_policy_threshold too")


def check_hyperparameters(temperature, epsilon_low, epsilon_high, delta, beta, ref_logp,
                          loss_type, importance_sampling_level) -> None:
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_choice("importance_sampling_level", importance_sampling_level, IS_LEVELS)
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


def id_range_checks(target: Tensor, V: int) -> dict:
    if target.numel() == 0:
        return {}
    return {f"target_ids must lie in [0, V={V})": (target.min() >= 0) & (target.max() < V)}


# ----------------------------------------------------------------------------- packed inputs


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


def prepare_loss(
    what: str, lead_shape: tuple, V: int, device, target_ids, cu_seqlens, completion_mask,
    advantages, old_logp, ref_logp, *, rewards, group_size, scale_rewards, loss_type,
    max_completion_length, num_items_in_batch, impl, policy_weight=None, sampling_logp=None,
) -> LossSetup:
    """what: "logits" or "hidden", for messages. lead_shape: (N,) packed or (B, L) padded."""
    impl = resolve_impl(impl, device)
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
        target, flat_idx = check_ids(target_ids, (N,), device), None
        cu, S = _check_cu_seqlens(what, cu_seqlens, device)
        old_logp = check_float_vector("old_logp", old_logp, (N,), device)
        ref_logp = check_float_vector("ref_logp", ref_logp, (N,), device)
        policy_weight = check_float_vector("policy_weight", policy_weight, (N,), device)
        sampling_logp = check_float_vector("sampling_logp", sampling_logp, (N,), device)
        checks, longest = _cu_seqlens_checks(what, cu, N), None
    else:
        raise ValueError(f"{what} must be (N, ...) packed or (B, L, ...) padded, got leading shape {tuple(lead_shape)}")
    checks.update(id_range_checks(target, V))

    if (advantages is None) == (rewards is None):
        raise ValueError("give exactly one of advantages or rewards (with group_size)")
    if rewards is not None:
        if group_size is None:
            raise ValueError("rewards need group_size")
        check_float_vector("rewards", rewards, (S,), device)
        check_group("S", S, group_size, scale_rewards)
        # The op of terms.py, looked up by name: terms imports this module, not the reverse.
        advantages = op("group_advantages")(rewards.detach().float().contiguous(), group_size, scale_rewards, 1e-4, impl)
    else:
        if group_size is not None:
            raise ValueError("group_size is only used with rewards; advantages are already normalized")
        advantages = check_float_vector("advantages", advantages, (S,), device).contiguous()

    wanted = {}
    if loss_type == "dr_grpo" and max_completion_length is None and longest is None:
        wanted["longest"] = (cu[1:] - cu[:-1]).max()
    host = device_checks(checks, wanted)
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
        target_full = check_ids(target_ids, (B, L), device)
        if completion_mask is None:
            mask = torch.ones(B, L, dtype=torch.bool, device=device)
            self.checks = {}
        else:
            if not isinstance(completion_mask, Tensor) or tuple(completion_mask.shape) != (B, L):
                raise ValueError(f"completion_mask must be a tensor of shape {(B, L)} to match {what}")
            check_device("completion_mask", completion_mask, device)
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
        x = check_float_vector(name, x, self.token_shape, self.flat_idx.device)
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
    check_device("cu_seqlens", cu_seqlens, device)
    return cu_seqlens.contiguous(), cu_seqlens.shape[0] - 1


def _cu_seqlens_checks(what: str, cu: Tensor, N: int) -> dict:
    return {
        "cu_seqlens must start at 0": cu[0] == 0,
        f"cu_seqlens must end at N={N}, the number of {what} rows": cu[-1] == N,
        "cu_seqlens must be non-decreasing": (cu[1:] >= cu[:-1]).all(),
    }


# ----------------------------------------------------------------------------- op arguments and output


@dataclass
class GRPOLossOutput:
    """What grpo_loss returns. Token-shaped fields are (N,) packed or (B, L) padded (zero
    where the mask is 0); everything but `loss` is detached."""
    loss: Tensor                # () fp32, differentiable with respect to logits
    logp: Tensor                # (N,) | (B, L) fp32: log softmax(logits / T)[target]
    kl: Optional[Tensor]        # (N,) | (B, L) fp32 k3 KL to the reference (times the importance
                                # ratio with bias_correction_kl); None without ref_logp
    advantages: Tensor          # (S,) fp32, given or computed from rewards
    clip_low_frac: Tensor       # () fp32: share of tokens with ratio < 1 - eps_low and A < 0
    clip_high_frac: Tensor      # () fp32: share of tokens with ratio > 1 + eps_high and A > 0
    entropy: Optional[Tensor]   # (N,) | (B, L) fp32 entropy of softmax(logits / T), if asked


def epilogue_arguments(setup: LossSetup, loss_type, importance_sampling_level, beta, epsilon_low,
                       epsilon_high, delta, off_policy_threshold, bias_correction_kl,
                       sapo_temperature_pos, sapo_temperature_neg, vespo_params, vespo_log_offset) -> dict:
    """The arguments both forward ops share (see logits.grpo_loss_fwd), by name."""
    S = setup.advantages.shape[0]
    offset = check_float_vector("vespo_log_offset", vespo_log_offset, (S,), setup.advantages.device)
    if offset is not None and loss_type != "vespo":
        raise ValueError("vespo_log_offset is only read by loss_type='vespo'")
    k_pos, lambda_pos, k_neg, lambda_neg = (float(x) for x in vespo_params)
    return dict(
        vespo_log_offset=None if offset is None else offset.contiguous(), vespo_k_pos=k_pos,
        vespo_lambda_pos=lambda_pos, vespo_k_neg=k_neg, vespo_lambda_neg=lambda_neg,
        cu_seqlens=setup.cu_seqlens, advantages=setup.advantages, old_logp=setup.old_logp,
        ref_logp=setup.ref_logp, policy_weight=setup.policy_weight, sampling_logp=setup.sampling_logp,
        beta=float(beta), eps_low=float(epsilon_low), eps_high=float(epsilon_high),
        delta=None if delta is None else float(delta), inv_norm=setup.inv_norm,
        per_seq_mean=loss_type in PER_SEQ_MEAN_LOSSES, seq_level=importance_sampling_level == "sequence",
        policy=POLICY_OF_LOSS[loss_type], sapo_tau_pos=float(sapo_temperature_pos),
        sapo_tau_neg=float(sapo_temperature_neg),
        off_policy_threshold=None if off_policy_threshold is None else float(off_policy_threshold),
        bias_correction_kl=bool(bias_correction_kl), impl=setup.impl)


def make_output(setup: LossSetup, loss, logp, kl, entropy, low, high, return_entropy) -> GRPOLossOutput:
    """The public output from a forward op's (N,)-shaped results, in the caller's layout."""
    return GRPOLossOutput(
        loss=loss, logp=setup.unpack(logp), kl=setup.unpack(kl) if setup.ref_logp is not None else None,
        advantages=setup.advantages.detach(), clip_low_frac=low.detach(), clip_high_frac=high.detach(),
        entropy=setup.unpack(entropy) if return_entropy else None)
