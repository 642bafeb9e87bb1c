"""The policy: a local Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint in Hugging Face format, loaded and saved.

(Trainer checkpoints, which hold a policy next to the optimizer and the random states, are
r1vl.run.checkpoints.)

Nothing is fetched: every from_pretrained runs with local_files_only, so a path that is
not a checkpoint fails here, at start-up, with a message saying what is missing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from r1vl import distributed, files
from r1vl.config import DataOptions, ModelOptions
from r1vl.model.activation_checkpointing import enable_activation_checkpointing
from r1vl.model.attention import sdpa_attention, use_varlen_attention
from r1vl.model.families import FAMILIES, family
from r1vl.model.lora import add_adapters, has_adapters, merged_state_dict, peft_model_of


@dataclass
class Policy:
    model: torch.nn.Module  # a FAMILIES ForConditionalGeneration (r1vl.model.families)
    tokenizer: object  # a transformers tokenizer holding the Qwen special tokens
    image_processor: object  # Qwen2VLImageProcessor(Pil): PIL image -> pixel_values, image_grid_thw


def check_checkpoint_dir(path: str | Path) -> str:
    """The model family of a checkpoint directory; ValueError saying what is wrong otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"--model {path}: not a directory (expected a local Qwen2-VL checkpoint)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"--model {path}: no config.json; not a Hugging Face checkpoint directory")
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    family(model_type, f"--model {path}")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"--model {path}: no *.safetensors weights")
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
        raise ValueError(f"--model {path}: no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    if not (path / "preprocessor_config.json").is_file():
        raise ValueError(f"--model {path}: no preprocessor_config.json (the image processor)")
    return model_type


def load_policy(path: str | Path, dtype: torch.dtype, device: torch.device,
                min_pixels: int, max_pixels: int) -> Policy:
    """Model in eval mode on `device` in `dtype`, its tokenizer and image processor.

    The image processor takes min/max_pixels from the trainer's options, not the file, so
    that the paper's max_pixels applies to any checkpoint.
    """
    import transformers
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cls = getattr(transformers, FAMILIES[check_checkpoint_dir(path)].model_class)
    model = cls.from_pretrained(path, dtype=dtype, local_files_only=True, attn_implementation="sdpa")
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    # The PIL processor: the same arithmetic as the torchvision one, without torchvision (all
    # three families use Qwen2-VL's image processor; Qwen3-VL's file sets 16-pixel patches).
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(
        path, local_files_only=True, min_pixels=min_pixels, max_pixels=max_pixels)
    for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"):
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            raise ValueError(f"--model {path}: the tokenizer has no {token} token (not a Qwen2-VL tokenizer)")
    if tokenizer.convert_tokens_to_ids("<|image_pad|>") != model.config.image_token_id:
        raise ValueError(f"--model {path}: tokenizer and config disagree on the image token id")
    return Policy(model, tokenizer, image_processor)


def save_policy(policy: Policy, out_dir: str | Path) -> Path:
    """The policy in Hugging Face format (safetensors), with tokenizer and image processor."""
    out_dir = Path(out_dir)
    # Packed training switched attention to a name registered at run time; a saved config
    # must load anywhere, so it is written with sdpa and switched back afterwards.
    with sdpa_attention(policy.model):
        if has_adapters(policy.model):  # the merged weights; the adapter itself beside them
            policy.model.save_pretrained(out_dir, safe_serialization=True, state_dict=merged_state_dict(policy.model))
            save_adapter(policy, out_dir / "adapter")
        else:
            policy.model.save_pretrained(out_dir, safe_serialization=True)
    policy.tokenizer.save_pretrained(out_dir)
    policy.image_processor.save_pretrained(out_dir)
    return out_dir


def save_adapter(policy: Policy, out_dir: str | Path) -> Path:
    """The LoRA adapter alone, as peft writes it (adapter_config.json, adapter_model.safetensors):
    PeftModel.from_pretrained(the model the adapters sit on, out_dir) loads it."""
    peft_model_of(policy.model).save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)


def save_full_policy(policy: Policy, out_dir: str | Path, world: distributed.Dist) -> Path:
    """save_policy of the full weights (gathered first if ZeRO-3 shards them) by rank 0, under
    a temporary name then renamed (r1vl.files); every rank calls it and returns once it is
    written."""
    return _save_by_rank0(save_policy, policy, Path(out_dir), world)


def save_full_adapter(policy: Policy, out_dir: str | Path, world: distributed.Dist) -> Path:
    """save_adapter by rank 0 (gathered first if ZeRO-3 shards the adapters), under a
    temporary name then renamed; every rank calls it."""
    return _save_by_rank0(save_adapter, policy, Path(out_dir), world)


def _save_by_rank0(save, policy: Policy, out_dir: Path, world: distributed.Dist) -> Path:
    with distributed.gathered(policy.model):
        if world.is_main:
            tmp = files.temporary(out_dir)
            save(policy, tmp)
            files.publish(tmp, out_dir)
    distributed.barrier()
    return out_dir


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The vision tower (ViT blocks, patch merger, Qwen3-VL's DeepStack mergers) of a FAMILIES
    model, its ForConditionalGeneration or its base model, in either module layout of transformers."""
    for owner in (model, getattr(model, "model", None)):
        if owner is not None and hasattr(owner, "visual"):
            return owner.visual
    raise ValueError(f"{type(model).__name__} has no vision tower (.visual): not a Qwen2-VL family model")


def eos_token_ids(tokenizer) -> list[int]:
    """The tokens that end an assistant turn (<|im_end|>, <|endoftext|>): where sampling stops."""
    return sorted({tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")})


TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_trainable(path: str, options: ModelOptions, dataset: DataOptions, world: distributed.Dist) -> Policy:
    """The policy every rank starts training from (rank 0's weights), switched to the packed
    attention, its vision tower frozen with --freeze_vision_tower.

    options: dtype ("auto": bf16 on CUDA, else fp32), attention, freeze_vision_tower,
    activation_checkpointing ("on": every decoder layer and vision block), lora_* (lora_rank > 0:
    fresh LoRA adapters, r1vl.model.lora); dataset: min_pixels, max_pixels (the image processor's).
    """
    dtype = TORCH_DTYPES.get(options.dtype) or (torch.bfloat16 if world.device.type == "cuda" else torch.float32)
    policy = load_policy(path, dtype, world.device, dataset.min_pixels, dataset.max_pixels)
    use_varlen_attention(policy.model, None if options.attention == "auto" else options.attention)
    distributed.broadcast_parameters(policy.model)
    if options.freeze_vision_tower:  # before any engine exists: engines optimize what requires grad
        vision_tower(policy.model).requires_grad_(False)
    if options.lora_rank:  # every weight frozen but the adapters (r1vl.model.lora)
        add_adapters(policy.model, options)
    if options.activation_checkpointing == "on":  # "auto" was resolved by the memory plan
        enable_activation_checkpointing(policy.model)
    return policy
