"""The built-in tiny model: a checkpoint directory made offline, loaded like any other.

`write_tiny_checkpoint(out_dir, texts)` trains a byte-level BPE tokenizer on `texts` (with
the Qwen special tokens), builds a randomly initialised Qwen2-VL (or, with family=, a
Qwen2.5-VL or Qwen3-VL) from a config sized for a CPU, and saves model (safetensors),
tokenizer and image processor in Hugging Face format. The trainer then loads it through the
same path as `--model PATH`, so the demo exercises the real loading code.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

# Qwen2-VL's special tokens; they get the ids 0.. in this order.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """A Qwen2Tokenizer from a byte-level BPE trained on `texts` (any text encodes: bytes
    outside the corpus fall back to the 256 byte tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # transformers 5 takes the vocabulary and merges themselves (vocab=, merges=).
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None, bos_token=None,
                               eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return tokenizer


# The tiny model of each family: the same language model width and depth, each family's own
# layers (Qwen3-VL: q/k norms, unbiased projections, interleaved M-RoPE) and vision tower.
TINY_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
PATCH_SIZE = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16}


def tiny_config(vocab_size: int = 1024, ids: dict | None = None, tie_word_embeddings: bool = False,
                family: str = "qwen2_vl"):
    """The built-in model's config: 4 text layers of width 128 (grouped-query attention, 4
    query / 2 key-value heads of 32), a one-block vision tower of width 64 (Qwen3-VL: 16-pixel
    patches, 64 learned position embeddings, a DeepStack merger after its block feeding
    decoder layer 0). ids: the special tokens' ids (default: build_tokenizer's, 0.. in
    SPECIAL_TOKENS order)."""
    import transformers

    if family not in TINY_FAMILIES:
        raise ValueError(f"tiny model: family {family!r} is not one of {TINY_FAMILIES}")
    ids = ids or {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
    text = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=384,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048, rope_parameters=rope,
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    common_vision = dict(num_heads=2, patch_size=PATCH_SIZE[family], temporal_patch_size=2, spatial_merge_size=2)
    if family == "qwen2_vl":
        config_class, vision = transformers.Qwen2VLConfig, dict(depth=1, embed_dim=64, hidden_size=128, mlp_ratio=2)
    elif family == "qwen2_5_vl":
        config_class = transformers.Qwen2_5_VLConfig
        vision = dict(depth=1, hidden_size=64, intermediate_size=128, out_hidden_size=128, fullatt_block_indexes=[0])
    else:
        config_class = transformers.Qwen3VLConfig
        text.update(head_dim=32, rope_parameters=dict(rope, mrope_interleaved=True))
        vision = dict(depth=1, hidden_size=64, intermediate_size=128, out_hidden_size=128,
                      num_position_embeddings=64, deepstack_visual_indexes=[0])
    return config_class(
        text_config=text, vision_config={**common_vision, **vision}, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=tie_word_embeddings)


def build_model(tokenizer, seed: int = 0, tie_word_embeddings: bool = False, family: str = "qwen2_vl") -> torch.nn.Module:
    """A random fp32 model of `family` (tiny_config) for the tokenizer's vocabulary.
    tie_word_embeddings: lm_head shares the input embedding's weight, as in Qwen2-VL-2B and
    the small Qwen3-VL models."""
    import transformers

    from r1vl.model.families import FAMILIES

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = tiny_config(len(tokenizer), ids, tie_word_embeddings, family)
    torch.manual_seed(seed)
    return getattr(transformers, FAMILIES[family].model_class)(config).float()


def write_tiny_checkpoint(out_dir: str | Path, texts: Iterable[str], seed: int = 0,
                          max_pixels: int = 56 * 56, min_pixels: int = 56 * 56, family: str = "qwen2_vl") -> Path:
    """Write a tiny checkpoint of `family` (config, safetensors, tokenizer, image processor)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(texts)
    model = build_model(tokenizer, seed, family=family)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # Qwen3-VL's processor: 16-pixel patches, pixels scaled to [-1, 1] (mean = std = 0.5).
    qwen3 = dict(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3) if family == "qwen3_vl" else {}
    Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, **qwen3).save_pretrained(out_dir)
    return out_dir


# The built-in task's training records: about as many examples as the warm-up sees, so that
# it learns to read the pictures rather than recall the answers of a few hundred records
# (benchmarks/results/learning.md has the runs behind the figure).
SYNTHETIC_TRAINING_RECORDS = 4096


def prepare_demo(dataset, family: str, held_out: int, seed: int, run_dir: Path, world) -> tuple[str, str]:
    """The built-in demo's data and model: the synthetic task and a tiny checkpoint written by
    rank 0 into the run directory, then loaded by every rank like any other. Returns (data
    file, model directory). dataset: r1vl.config.DataOptions (data, image_root,
    min/max_pixels); family: --family ("" = qwen2_vl); held_out: --eval_prompts, written on top
    of the training records; seed: the run's."""
    from r1vl import distributed
    from r1vl.data.records import load_examples
    from r1vl.data.synthetic import write_dataset

    data = dataset.data or str(run_dir / "synthetic" / "data.jsonl")
    model_dir = run_dir / "tiny-init"
    written = Path(data).is_file() and (model_dir / "model.safetensors").is_file()
    if world.is_main and not written:  # a resumed run finds them in place
        if not dataset.data:
            write_dataset(run_dir / "synthetic", n=SYNTHETIC_TRAINING_RECORDS + held_out, seed=seed)
            corpus = load_examples(data, dataset.image_root or None).items
        else:  # the user's data, in any form --data takes
            from r1vl.data.table import TableOptions, open_examples

            corpus = open_examples(TableOptions.of(dataset, data))
        texts = [e.problem for e in corpus] + [e.solution for e in corpus]
        write_tiny_checkpoint(model_dir, texts, seed=seed, max_pixels=dataset.max_pixels,
                              min_pixels=dataset.min_pixels, family=family or "qwen2_vl")
    distributed.barrier()
    return data, str(model_dir)
