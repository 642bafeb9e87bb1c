"""The --deepspeed JSON: r1vl's checks of a DeepSpeed config, and the values r1vl fills in.

Plain values in and out; nothing from r1vl and nothing from deepspeed is imported, so that
the options (r1vl.config) can check the file at start-up. What the values mean for the
engine: r1vl.update.deepspeed_engine.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

# Top-level keys passed to DeepSpeed as they are (it validates their contents itself).
PASSED_KEYS = ("zero_optimization", "bf16", "steps_per_print", "wall_clock_breakdown", "memory_breakdown",
               "communication_data_type", "prescale_gradients", "gradient_predivide_factor", "data_types",
               "comms_logger")
# Keys r1vl sets itself: "auto" or absent (gradient_clipping may also equal --max_grad_norm).
OWNED_KEYS = {
    "train_batch_size": "the global batch is --batch_size completions per rank, packed into micro-batches of "
                        "--micro_batch_tokens",
    "train_micro_batch_size_per_gpu": "micro-batches are packed by tokens (--micro_batch_tokens)",
    "gradient_accumulation_steps": "a step accumulates all of a rank's packed micro-batches, however many",
    "gradient_clipping": "it is --max_grad_norm",
}
REFUSED_KEYS = {
    "optimizer": "r1vl's AdamW is used; set --lr, --sft_lr, --weight_decay, --adam_beta1, --adam_beta2",
    "scheduler": "r1vl's schedule is used; set --lr_schedule and --warmup_steps",
    "managed_gradient_accumulation": "r1vl sets it to false (engine.step() is the accumulation boundary)",
}
ZERO_STAGES = (2, 3)



def read_deepspeed_config(path: str, dtype: str, max_grad_norm: float) -> dict:
    """The JSON at `path` (--deepspeed), checked against r1vl's options (--dtype, --max_grad_norm).

    Raises ValueError naming --deepspeed (and the conflicting option) for a missing or
    unparsable file, an unknown or refused key, a ZeRO stage other than 2/3, NVMe offload or parameter offload without ZeRO-3,
    fp16, or a value that contradicts --dtype / --max_grad_norm. DeepSpeed itself checks the
    contents of zero_optimization when the engine is built.
    """
    where = f"--deepspeed {path}"
    if not Path(path).is_file():
        raise ValueError(f"{where}: no such file")
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object of DeepSpeed options")

    for key, value in raw.items():
        if key in REFUSED_KEYS:
            raise ValueError(f"{where}: {key!r} is not taken: {REFUSED_KEYS[key]}")
        if key in OWNED_KEYS:
            clipping_agrees = key == "gradient_clipping" and _is_number(value) and value == max_grad_norm
            if value != "auto" and not clipping_agrees:
                raise ValueError(f"{where}: {key} must be \"auto\" or absent ({OWNED_KEYS[key]}), got {value!r}")
        elif key == "fp16":
            if not isinstance(value, dict) or value.get("enabled", False) not in (False, "auto"):
                raise ValueError(f"{where}: fp16 is not supported (its loss scaling skips updates that r1vl would "
                                 "count as bad steps); use bf16 (--dtype bfloat16) or float32")
        elif key not in PASSED_KEYS:
            raise ValueError(f"{where}: unknown or unsupported key {key!r}; allowed: "
                             f"{sorted([*PASSED_KEYS, *OWNED_KEYS, 'fp16'])}")

    zero = raw.get("zero_optimization")
    if not isinstance(zero, dict) or zero.get("stage") not in ZERO_STAGES:
        raise ValueError(f"{where}: zero_optimization.stage must be one of {ZERO_STAGES}")
    for offload in ("offload_optimizer", "offload_param"):
        section = zero.get(offload)
        if section is None:
            continue
        if not isinstance(section, dict) or section.get("device", "none") not in ("none", "cpu"):
            raise ValueError(f"{where}: zero_optimization.{offload}.device must be \"cpu\" or \"none\" (NVMe is "
                             "not supported: r1vl's memory plan does not account for it)")
        if offload == "offload_param" and section.get("device") == "cpu" and zero["stage"] != 3:
            raise ValueError(f"{where}: zero_optimization.offload_param needs stage 3 (ZeRO-2 keeps whole weights)")
    if zero.get("compute_grad_norm", True) is False:
        raise ValueError(f"{where}: zero_optimization.compute_grad_norm must stay true: the norm is logged, and a "
                         "non-finite norm is how every rank skips an update (--max_bad_steps)")
    if zero.get("elastic_checkpoint"):
        raise ValueError(f"{where}: zero_optimization.elastic_checkpoint is not supported (r1vl saves each "
                         "rank's shard of the optimizer state and resumes on as many ranks)")

    bf16 = raw.get("bf16", {})
    if not isinstance(bf16, dict):
        raise ValueError(f"{where}: bf16 must be an object such as {{\"enabled\": \"auto\"}}")
    if bf16.get("check_grad_overflow", True) is False:
        raise ValueError(f"{where}: bf16.check_grad_overflow must stay true: it is how every rank skips an "
                         "update with a non-finite gradient (--max_bad_steps)")
    _check_precision(raw, where, dtype, "--dtype", dtype)
    return raw


def _check_precision(raw: dict, where: str, dtype: str, named: str, shown: str) -> None:
    """The file's bf16.enabled against the run's dtype, the one precision check: at start-up
    with --dtype (dtype "auto": not known yet), and when the engine is built with the
    model's actual dtype. named / shown: how a message names the dtype and its value."""
    if dtype == "float16":
        raise ValueError(f"{named} {shown} with {where}: fp16 is not supported; use bfloat16 or float32")
    enabled = raw.get("bf16", {}).get("enabled", "auto")
    if enabled not in ("auto", True, False):
        raise ValueError(f"{where}: bf16.enabled must be true, false or \"auto\", got {enabled!r}")
    if enabled != "auto" and dtype != "auto" and enabled != (dtype == "bfloat16"):
        raise ValueError(f"{where}: bf16.enabled is {str(enabled).lower()} but {named} is {shown}; set "
                         "bf16.enabled to \"auto\" (it follows --dtype) or make them agree")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resolved_config(raw: dict, path: str, dtype: torch.dtype, max_grad_norm: float, world_size: int) -> dict:
    """The config handed to deepspeed.initialize: `raw` (read_deepspeed_config of `path`) with
    r1vl's values filled in. dtype: the model's; bf16 is enabled exactly when it is bfloat16."""
    _check_precision(raw, f"--deepspeed {path}", str(dtype).removeprefix("torch."), "the model's dtype", str(dtype))
    out = copy.deepcopy(raw)
    out.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=world_size,
               gradient_clipping=max_grad_norm, managed_gradient_accumulation=False)
    out["bf16"] = {**raw.get("bf16", {}), "enabled": dtype == torch.bfloat16}
    out["fp16"] = {"enabled": False}
    out.setdefault("steps_per_print", 2**62)  # r1vl prints its own lines
    if (raw["zero_optimization"].get("offload_optimizer") or {}).get("device") == "cpu":
        # r1vl's torch AdamW then steps the fp32 shard on the CPU: the same update rule and
        # the same checkpoint state as without offload (DeepSpeedCPUAdam would be faster).
        out["zero_force_ds_cpu_optimizer"] = False
    return out
