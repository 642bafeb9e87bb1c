"""The model families r1vl trains, and what differs between them that r1vl has to know.

Everything else is read from the model itself: the decoder's layers, the rope index
(`get_rope_index`), the vision tower's output (Qwen3-VL's DeepStack features included), the
image processor's patch size. What is proven for which family: the README's table.
"""
from __future__ import annotations

from dataclasses import dataclass

# Qwen2-VL's and Qwen2.5-VL's chat templates open with this system turn when the conversation
# has none; Qwen3-VL's template adds no system turn.
QWEN2_SYSTEM = "You are a helpful assistant."


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's model_type
    model_class: str  # the transformers ForConditionalGeneration class
    default_system: str | None  # the chat template's system turn when the prompt gives none


FAMILIES = {f.model_type: f for f in (
    Family("qwen2_vl", "Qwen2VLForConditionalGeneration", QWEN2_SYSTEM),
    Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", QWEN2_SYSTEM),
    Family("qwen3_vl", "Qwen3VLForConditionalGeneration", None),
)}

# Families a user may try, refused by name with the reason.
REFUSED = {
    "qwen3_vl_moe": "Qwen3-VL-MoE's decoder routes each token to experts: the decode step's fused "
                    "projections, the memory plan and the update have no expert routing or router "
                    "loss; use a dense Qwen3-VL (2B / 4B / 8B / 32B)",
}


def family(model_type: str | None, what: str = "--model") -> Family:
    """The Family of a config's model_type; ValueError naming the supported ones otherwise."""
    if model_type in REFUSED:
        raise ValueError(f"{what}: model_type {model_type!r} is not supported: {REFUSED[model_type]}")
    if model_type not in FAMILIES:
        raise ValueError(f"{what}: model_type {model_type!r} is not one of {tuple(FAMILIES)}")
    return FAMILIES[model_type]


def family_of(model) -> Family:
    """The Family of a loaded model (its config's model_type)."""
    return family(model.config.model_type, type(model).__name__)
