"""LoRA through peft (--lora_rank R > 0): adapters on the policy, the weights they stand for.

    peft_model = add_adapters(model, options)     # in place: model's targeted nn.Linear become peft LoRA layers
    weight, bias = linear_weight(module)      # what a (LoRA or plain) linear computes, as one weight
    with adapters_off(model): ...             # the base model: the KL reference, no second copy
    merged_state_dict(model)                  # the merged weights under the plain model's names

The trainer keeps `policy.model` the Hugging Face model itself (peft injects its layers into
it in place), so every path that reads `model.model`, `model.lm_head`, `.visual` runs
unchanged; the PeftModel wrapper is kept beside it for what only peft does (disable_adapter,
save_pretrained of the adapter). peft freezes every weight but the adapters, so the engines,
which optimize what requires grad, see only the adapters (in the model's dtype, with the
engine's fp32 masters under a bf16 model, as every trained weight).

Where the project reads weights instead of calling modules, it reads `linear_weight`: the
base weight plus each active adapter's delta (peft's own get_delta_weight, rounded to the base
dtype and added, as peft's merge does), differentiable, so that
  - the fused loss sees the merged lm_head when lm_head is adapted;
  - the sampler's joined decode weights (q/k/v, gate/up, o, down) are merged every rollout.
"""
from __future__ import annotations

import contextlib
import sys

import torch

ADAPTER_NAME = "default"  # peft's name of the single adapter


def is_lora_layer(module: torch.nn.Module) -> bool:
    if "peft" not in sys.modules:  # nothing can be a LoRA layer; runs without LoRA never import peft
        return False
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def has_adapters(model: torch.nn.Module) -> bool:
    return getattr(model, "r1vl_peft", None) is not None


def peft_model_of(model: torch.nn.Module):
    """The PeftModel wrapping `model` (set by add_adapters), or None."""
    return getattr(model, "r1vl_peft", None)


def target_names(model: torch.nn.Module, options) -> list[str]:
    """Full names of the linear layers to adapt: the --lora_target_modules projections inside
    the language model's decoder layers (lm_head if named), and with --lora_vision every
    nn.Linear of the vision tower (blocks, merger, Qwen3-VL's DeepStack mergers).
    ValueError naming a module the model does not have."""
    wanted = [n.strip() for n in options.lora_target_modules.split(",")]
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    names, found = [], set()
    for name in linears:
        parts = name.split(".")
        if name == "lm_head" and "lm_head" in wanted:
            names.append(name)
            found.add("lm_head")
        elif "language_model" in parts and "layers" in parts and parts[-1] in wanted:
            names.append(name)
            found.add(parts[-1])
        elif options.lora_vision and "visual" in parts:
            names.append(name)
    missing = sorted(set(wanted) - found)
    if missing:
        raise ValueError(f"--lora_target_modules: {type(model).__name__} has no linear {missing} in its decoder "
                         f"layers (it has {sorted({n.split('.')[-1] for n in linears if '.layers.' in n})})")
    return names


def lora_config(model: torch.nn.Module, options):
    """peft's LoraConfig for the options: rank, alpha (0 = 2 x rank), dropout, the targets by
    full name (so that a projection name shared with the vision tower never reaches it)."""
    from peft import LoraConfig

    return LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha or 2 * options.lora_rank,
                      lora_dropout=options.lora_dropout, target_modules=target_names(model, options), bias="none")


def add_adapters(model: torch.nn.Module, options):
    """Wrap `model` with fresh LoRA adapters (peft's initialisation: A random, B zero, so the
    policy is unchanged; rank 0's on every rank) and return the PeftModel; `model` itself is
    changed in place and remembers it (peft_model_of). Every weight but the adapters is
    frozen. Every rank calls it, on a model not yet sharded."""
    from peft import get_peft_model

    # Adapters in the model's dtype (peft would make them fp32 under a bf16 model): the engine
    # keeps fp32 masters of them as of any bf16 weight, and a bf16 adapter reads the layer's
    # input as it is, where an fp32 one saves an fp32 copy of it for backward per projection.
    peft = get_peft_model(model, lora_config(model, options), autocast_adapter_dtype=False)
    # Not a registered submodule (it holds the model: a cycle in state_dict).
    object.__setattr__(model, "r1vl_peft", peft)
    # Every rank starts from rank 0's adapters: the ranks' random streams need not agree here
    # (the built-in run's rank 0 alone draws the tiny model), and A is drawn from them.
    if torch.distributed.is_initialized():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                torch.distributed.broadcast(p.data, src=0)
    return peft


def linear_weight(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias (out,) or None) of what `module` computes: a plain nn.Linear's
    own, or a peft LoRA layer's base weight + delta of each active adapter (none while
    adapters are disabled or merged), differentiable with respect to the adapters."""
    if not is_lora_layer(module):
        return module.weight, getattr(module, "bias", None)
    base = module.get_base_layer()
    weight = base.weight
    if not module.disable_adapters and not module.merged:
        for name in module.active_adapters:
            if name in module.lora_A:
                weight = weight + module.get_delta_weight(name).to(weight.dtype)
    return weight, base.bias


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module):
    """The base model inside: every LoRA layer's adapters disabled through peft's layer API
    (BaseTunerLayer.enable_adapters, what PeftModel.disable_adapter() calls underneath), and
    enabled again on exit. Not PeftModel.disable_adapter() itself: it also collects the
    model's status, walking every module several times, about 200 ms per call on the tiny
    demo model (measured, cProfile), and the reference runs once per micro-batch."""
    if not has_adapters(model):
        raise ValueError("adapters_off: the model has no LoRA adapters")
    layers = [m for m in model.modules() if is_lora_layer(m) and not m.disable_adapters]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def adapters_enabled(model: torch.nn.Module) -> bool:
    """True when `model` has LoRA adapters and they are switched on."""
    return has_adapters(model) and any(is_lora_layer(m) and not m.disable_adapters for m in model.modules())


@contextlib.contextmanager
def merged_adapters(model: torch.nn.Module):
    """Inside, every LoRA layer is a plain linear on its merged weight (the weights saved to
    final/, r1vl.model.policy.save_policy): each base weight points at a merged copy, the
    adapters are off. For the rollout, which then reads every weight, its joined decode weights
    included, exactly as a model loaded from the merged weights would. No gradients inside;
    the base weights are put back on exit. Costs one merged copy of the adapted weights."""
    layers = [m for m in model.modules() if is_lora_layer(m)]
    with torch.no_grad():
        merged = [linear_weight(m)[0] for m in layers]  # base + delta rounded as peft's merge does
    bases = [m.get_base_layer().weight for m in layers]
    originals = [w.data for w in bases]
    with adapters_off(model):
        try:
            for weight, value in zip(bases, merged):
                weight.data = value
            yield model
        finally:
            for weight, value in zip(bases, originals):
                weight.data = value


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with the adapters merged, under the names of the model without
    peft (what save_pretrained writes and transformers loads). New tensors for the merged
    layers only; the rest are the model's own."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if is_lora_layer(module):
            weight, bias = linear_weight(module)
            state[f"{name}.weight"] = weight.detach().clone()
            if bias is not None:
                state[f"{name}.bias"] = bias.detach()
    return {k: v for k, v in state.items() if ".base_layer." not in k and ".lora_" not in k}


@torch.no_grad()
def merge_into_base(model: torch.nn.Module, options):
    """Fold the adapters into the base weights and start fresh ones (after the SFT warm-up:
    GRPO's KL reference, the adapters switched off, is then the warmed-up policy). Returns
    the new PeftModel."""
    peft = peft_model_of(model)
    for module in model.modules():
        if is_lora_layer(module):
            weight, _ = linear_weight(module)
            module.get_base_layer().weight.copy_(weight)
    inner = peft.unload()  # the plain model, its LoRA layers replaced by their (merged) base layers
    object.__setattr__(inner, "r1vl_peft", None)
    if inner is not model:
        raise RuntimeError("peft unload returned another model object")
    return add_adapters(model, options)


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights as peft saves them (its get_peft_model_state_dict)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model_of(model))


def load_adapter_weights(model: torch.nn.Module, directory) -> None:
    """Set the adapters to those peft saved in `directory` (adapter_model.safetensors)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(directory) + "/adapter_model.safetensors", device=str(next(model.parameters()).device))
    result = set_peft_model_state_dict(peft_model_of(model), saved)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{directory}: adapter weights this model does not have: {unexpected[:3]}")
