"""Argument checks for the public functions: ValueError naming the argument, raised before
any kernel runs (an out-of-range id would otherwise be an illegal memory access later)."""
from typing import Optional

import torch
from torch import Tensor

from ._env import interpreting

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
