"""The built-in tiny Qwen2-VL: a checkpoint directory made offline, loaded like any other.

`write_tiny_checkpoint(out_dir, texts)` trains a byte-level BPE tokenizer on `texts` (with
the Qwen special tokens), builds a randomly initialised Qwen2-VL from a config sized for
a CPU, and saves model (safetensors), tokenizer and image processor in Hugging Face
format. The trainer then loads it through the same path as `--model PATH`, so the demo
exercises the real loading code.
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


def tiny_config(vocab_size: int = 1024, ids: dict | None = None, tie_word_embeddings: bool = False):
    """The built-in model's Qwen2VLConfig: 4 text layers of width 128 (grouped-query attention,
    4 query / 2 key-value heads), a one-block vision tower. ids: the special tokens' ids
    (default: build_tokenizer's, 0.. in SPECIAL_TOKENS order)."""
    from transformers import Qwen2VLConfig

    ids = ids or {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    text = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=384,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=1, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2)
    return Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=tie_word_embeddings)


def build_model(tokenizer, seed: int = 0, tie_word_embeddings: bool = False) -> torch.nn.Module:
    """A random fp32 Qwen2-VL (tiny_config) for the tokenizer's vocabulary.
    tie_word_embeddings: lm_head shares the input embedding's weight, as in Qwen2-VL-2B."""
    from transformers import Qwen2VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = tiny_config(len(tokenizer), ids, tie_word_embeddings)
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config).float()


def write_tiny_checkpoint(out_dir: str | Path, texts: Iterable[str], seed: int = 0,
                          max_pixels: int = 56 * 56, min_pixels: int = 56 * 56) -> Path:
    """Write a tiny Qwen2-VL checkpoint (config, safetensors, tokenizer, image processor)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(texts)
    model = build_model(tokenizer, seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(out_dir)
    return out_dir


# The built-in task's training records: about as many examples as the warm-up sees, so that
# it learns to read the pictures rather than recall the answers of a few hundred records
# (benchmarks/results/learning.md has the runs behind the figure).
SYNTHETIC_TRAINING_RECORDS = 4096


def prepare_demo(cfg, run_dir: Path, world) -> tuple[str, str]:
    """The built-in demo's data and model: the synthetic task and a tiny checkpoint written by
    rank 0 into the run directory, then loaded by every rank like any other. Returns (data
    file, model directory). cfg: data, eval_prompts, seed, image_root, min/max_pixels."""
    from r1vl import distributed
    from r1vl.data.records import load_examples
    from r1vl.data.synthetic import write_dataset

    data = cfg.data or str(run_dir / "synthetic" / "data.jsonl")
    model_dir = run_dir / "tiny-init"
    written = Path(data).is_file() and (model_dir / "model.safetensors").is_file()
    if world.is_main and not written:  # a resumed run finds them in place
        if not cfg.data:
            write_dataset(run_dir / "synthetic", n=SYNTHETIC_TRAINING_RECORDS + cfg.eval_prompts, seed=cfg.seed)
        corpus = load_examples(data, cfg.image_root or None).items
        texts = [e.problem for e in corpus] + [e.solution for e in corpus]
        write_tiny_checkpoint(model_dir, texts, seed=cfg.seed, max_pixels=cfg.max_pixels, min_pixels=cfg.min_pixels)
    distributed.barrier()
    return data, str(model_dir)
