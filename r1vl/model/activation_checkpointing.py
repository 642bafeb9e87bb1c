"""Activation checkpointing of the policy (--activation_checkpointing): every decoder layer of
the language model and every block of the vision tower keeps only its input in the forward
and is recomputed in the backward (non-reentrant torch.utils.checkpoint).

transformers' own mechanism does it: Qwen2-VL's decoder layers and vision blocks are
GradientCheckpointingLayer, whose forward goes through the checkpoint function when the flag
is set, the module is in training mode and gradients are enabled. So:
- the rollout (no_grad, KV-cache decoding through r1vl.sampling.decode), the old and reference
  log-probs (no_grad) and a frozen reference copy are never checkpointed;
- the update and the SFT warm-up run with the policy in train mode (engine.train()), and
  every keyword the packed forward passes to a layer (cu_seq_lens_*, the shared-prompt
  r1vl_key_index, position embeddings) reaches the recompute as it reached the forward;
- non-reentrant checkpointing needs no input that requires grad (transformers' hooks that make
  the embeddings' outputs require grad are removed again), works with DeepSpeed ZeRO-3
  (the recompute runs the submodules' own forward hooks, which gather their weights), and
  recomputes with the RNG state of the forward (no dropout in Qwen2-VL anyway).

The recompute runs the same kernels on the same inputs as the forward, so losses, log-probs
and gradients are bitwise those of a run without it (tests/r1vl/model/test_activation_checkpointing.py).
"""
from __future__ import annotations

import torch


def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules transformers checkpoints: every decoder layer and vision block."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_activation_checkpointing(model: torch.nn.Module) -> int:
    """Checkpoint every decoder layer and vision block of `model` (a Qwen2-VL /
    Qwen2.5-VL ForConditionalGeneration), non-reentrant. Returns how many layers are
    checkpointed; raises ValueError if the model has none."""
    layers = checkpointed_layers(model)
    if not layers:
        raise ValueError(f"--activation_checkpointing: {type(model).__name__} has no checkpointable layers")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # transformers also hooks the input embeddings (text, and the vision tower's patch
    # embedding) to make their outputs require grad, which reentrant checkpointing needs and
    # this one does not: with a frozen vision tower it would build its graph and save its
    # activations for a backward that computes nothing.
    model.disable_input_require_grads()
    missing = [type(m).__name__ for m in layers if not m.gradient_checkpointing]
    if missing:
        raise RuntimeError(f"--activation_checkpointing: not enabled on {sorted(set(missing))}")
    return len(layers)


def disable_activation_checkpointing(model: torch.nn.Module) -> None:
    model.activation_checkpointing_disable()
