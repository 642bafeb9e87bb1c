"""Tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL models and rollout-like sequences for CPU tests.

Built from configs, offline, in fp32: 2 text layers of width 64 with grouped-query attention
(4 query heads, 2 key/value heads), a small vision tower (Qwen2.5-VL: one windowed and one
full-attention block; Qwen3-VL: 16-pixel patches, learned position embeddings and a DeepStack
merger after each of its two blocks, feeding decoder layers 0 and 1), a 128-token vocabulary
whose top ids are the special tokens.
"""
import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from r1vl.update.packing import Sequence

VOCAB = 128
IMAGE, VIDEO, VISION_START, VISION_END = 120, 121, 122, 123
PATCH, TEMPORAL_PATCH, MERGE = 14, 2, 2
PIXEL_ROW = 3 * TEMPORAL_PATCH * PATCH * PATCH  # values per patch in pixel_values (Qwen2-VL, Qwen2.5-VL)
QWEN3_PATCH = 16

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def pixel_row(family: str) -> int:
    """Values per patch in a family's pixel_values: channels x temporal patch x patch**2."""
    return 3 * TEMPORAL_PATCH * (QWEN3_PATCH if family == "qwen3_vl" else PATCH) ** 2

_TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    bos_token_id=None, eos_token_id=None, pad_token_id=0,
)
_SPECIAL = dict(
    image_token_id=IMAGE, video_token_id=VIDEO,
    vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
)


def tiny_model(family: str, seed: int = 0, tie_word_embeddings: bool = False) -> torch.nn.Module:
    """A freshly initialised fp32 model of `family` in eval mode, with sdpa attention.
    tie_word_embeddings: the lm_head shares the input embedding (Qwen3-VL 2B/4B, Qwen2-VL-2B)."""
    torch.manual_seed(seed)
    special = dict(_SPECIAL, tie_word_embeddings=tie_word_embeddings)
    if family == "qwen2_vl":
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                      patch_size=PATCH, temporal_patch_size=TEMPORAL_PATCH, spatial_merge_size=MERGE)
        config = Qwen2VLConfig(text_config=_TEXT, vision_config=vision, **special)
        model = Qwen2VLForConditionalGeneration(config)
    elif family == "qwen2_5_vl":
        # window_size 112 px = 8 patches = 4 merged tokens: images wider than that get
        # several windows, and block 0 attends within windows, block 1 over the whole image.
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      fullatt_block_indexes=[1], window_size=112, patch_size=PATCH,
                      temporal_patch_size=TEMPORAL_PATCH, spatial_merge_size=MERGE)
        config = Qwen2_5_VLConfig(text_config=_TEXT, vision_config=vision, **special)
        model = Qwen2_5_VLForConditionalGeneration(config)
    elif family == "qwen3_vl":
        # head_dim 16: interleaved M-RoPE over 8 frequencies (t, h, w sections 2, 3, 3).
        text = dict(_TEXT, head_dim=16, rope_parameters=dict(_TEXT["rope_parameters"], mrope_interleaved=True))
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=QWEN3_PATCH, temporal_patch_size=TEMPORAL_PATCH, spatial_merge_size=MERGE,
                      num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        config = Qwen3VLConfig(text_config=text, vision_config=vision, **special)
        model = Qwen3VLForConditionalGeneration(config)
        with torch.no_grad():  # q_norm / k_norm start at 1: make their weights matter in the tests
            for layer in model.model.language_model.layers:
                for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                    norm.weight.uniform_(0.5, 1.5)
    else:
        raise ValueError(f"unknown family {family!r}")
    if tie_word_embeddings is not (model.lm_head.weight is model.get_input_embeddings().weight):
        raise AssertionError(f"{family}: tie_word_embeddings={tie_word_embeddings} did not take")
    model.set_attn_implementation("sdpa")
    return model.float().eval()


def image_tokens(grid: tuple[int, int, int]) -> int:
    t, h, w = grid
    return t * h * w // (MERGE * MERGE)


def make_sequence(
    gen: torch.Generator,
    grids: list[tuple[int, int, int]],
    completion_len: int,
    text_lens: list[int] | None = None,
    pixel_values: torch.Tensor | None = None,
    family: str = "qwen2_vl",
) -> Sequence:
    """A prompt of random text with each image as <vision_start> IMAGE*n <vision_end>, and a
    random completion. text_lens: lengths of the text pieces around the images (len(grids)+1).
    family: sizes the pixel rows (pixel_row).
    """
    text_lens = text_lens or [int(torch.randint(1, 9, (1,), generator=gen))] * (len(grids) + 1)
    text = lambda n: torch.randint(1, 100, (n,), generator=gen)  # noqa: E731
    pieces = [text(text_lens[0])]
    for grid, n in zip(grids, text_lens[1:]):
        pieces += [torch.tensor([VISION_START]), torch.full((image_tokens(grid),), IMAGE),
                   torch.tensor([VISION_END]), text(n)]
    if grids and pixel_values is None:
        rows = sum(t * h * w for t, h, w in grids)
        pixel_values = torch.randn(rows, pixel_row(family), generator=gen)
    return Sequence(
        prompt_ids=torch.cat(pieces),
        completion_ids=text(completion_len),
        pixel_values=pixel_values if grids else None,
        image_grid_thw=torch.tensor(grids) if grids else None,
    )


def make_group(gen: torch.Generator, grids: list[tuple[int, int, int]], completion_lens: list[int],
               family: str = "qwen2_vl") -> list[Sequence]:
    """len(completion_lens) sequences of one prompt (the same ids and pixels), as the sampler
    returns a prompt's G completions, with completions of the given lengths."""
    first = make_sequence(gen, grids, completion_lens[0], family=family)
    group = [first]
    for n in completion_lens[1:]:
        sibling = make_sequence(gen, grids, n, pixel_values=first.pixel_values)
        sibling.prompt_ids = first.prompt_ids
        group.append(sibling)
    return group


def grpo_batch(seed: int, G: int, family: str = "qwen2_vl"):
    """Three prompts x G completions of uneven lengths (one of length 1 in every group):
    a prompt with one image, one with two images, a text-only one; prompt-major order."""
    gen = torch.Generator().manual_seed(seed)
    sequences = []
    for grids in ([(1, 4, 6)], [(1, 2, 2), (1, 10, 4)], []):
        lens = [1] + [int(torch.randint(2, 14, (1,), generator=gen)) for _ in range(G - 1)]
        sequences += make_group(gen, grids, lens, family)
    return sequences
