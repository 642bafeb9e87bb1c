"""Examples to token ids: the Qwen-VL chat format with the image placeholders expanded.

    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n      (Qwen2-VL, Qwen2.5-VL only)
    <|im_start|>user\n<|vision_start|><|image_pad|> x n<|vision_end|>{problem}<|im_end|>\n
    <|im_start|>assistant\n

(one string, no line breaks but the \n shown) with n = t*h*w / merge**2 merged patches,
as the model's own chat template and processor would produce: Qwen2-VL's and Qwen2.5-VL's
templates add the system turn when the conversation has none, Qwen3-VL's adds none
(`system`, r1vl.model.families). The assistant turn ends with <|im_end|>, the token the
sampler stops at.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from r1vl.data.records import BadRecord, BadRecordError, Example, SFTExample, load_image
from r1vl.data.schemas import IMAGE_TAG
from r1vl.model.families import QWEN2_SYSTEM

SYSTEM = QWEN2_SYSTEM  # the default system turn (Qwen2-VL's template)
END = "<|im_end|>"


@dataclass
class Prompt:
    """One encoded prompt, ready for the sampler and for pack()."""

    ids: torch.Tensor  # (P,) int64, image placeholders expanded
    pixel_values: torch.Tensor  # (sum_i t_i*h_i*w_i, C*T*p*p) float32 patches of the images, in order
    image_grid_thw: torch.Tensor  # (n_images, 3) int64
    example: Example | None  # what the rewards score against (None for SFT)


def _image_block(image_processor, image, merge: int) -> tuple[str, torch.Tensor, torch.Tensor]:
    out = image_processor(images=[image], return_tensors="pt")
    grid = out["image_grid_thw"].to(torch.int64)
    n = int(grid.prod()) // (merge * merge)
    return "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>", out["pixel_values"].float(), grid


def _token_ids(tokenizer, text: str) -> torch.Tensor:
    """(L,) int64: `text` tokenized as it stands (the chat markers are in it already)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)


def _turn(role: str, text: str) -> str:
    return f"<|im_start|>{role}\n{text}{END}\n"


def _system_turn(system: str | None) -> str:
    return "" if system is None else _turn("system", system)


def _resize_factor(image_processor, merge: int) -> int:
    """Image sides are multiples of patch x merge pixels: 28 for Qwen2-VL, 32 for Qwen3-VL."""
    return int(image_processor.patch_size) * merge


def _image_blocks(images, image_processor, merge: int, max_pixels: int, min_pixels: int, source: str = ""):
    """Each image (any form load_image takes) resized and cut into patches: (placeholder text
    per image, (sum t*h*w, C*T*p*p) float32 pixel rows, (n, 3) int64 grids). Images are
    processed one by one, as the processor does a list of them."""
    blocks, pixels, grids = [], [], []
    for image in images:
        try:
            pil = load_image(image, max_pixels=max_pixels, min_pixels=min_pixels,
                             factor=_resize_factor(image_processor, merge))
        except ValueError as e:
            raise BadRecordError(BadRecord(*_where(source), str(e))) from None
        block, pixel_rows, grid = _image_block(image_processor, pil, merge)
        blocks.append(block)
        pixels.append(pixel_rows)
        grids.append(grid)
    return blocks, torch.cat(pixels), torch.cat(grids)


def _where(source: str) -> tuple[str, int]:
    """(file, record index) of an Example.source "<file>:<index>"."""
    path, _, index = source.rpartition(":")
    return (path, int(index)) if index.isdigit() else (source, -1)


def _place_images(text: str, blocks: list[str]) -> str:
    """The text with its "<image>" tags replaced by the image blocks in order; without tags,
    all blocks before the text (the paper's layout)."""
    if IMAGE_TAG not in text:
        return "".join(blocks) + text
    pieces = text.split(IMAGE_TAG)
    if len(pieces) - 1 != len(blocks):  # checked at start-up (r1vl.data.schemas); kept for direct callers
        raise ValueError(f"{len(pieces) - 1} {IMAGE_TAG} tags for {len(blocks)} images")
    return pieces[0] + "".join(b + p for b, p in zip(blocks, pieces[1:]))


def _conversation(messages, blocks: list[str], system: str | None) -> str:
    """Chat turns with image parts replaced by the blocks in order; the default system turn
    unless the conversation has its own."""
    text = "" if messages and messages[0]["role"] == "system" else _system_turn(system)
    blocks = iter(blocks)
    for message in messages:
        parts = [next(blocks) if p["type"] == "image" else p["text"] for p in message["content"]]
        text += _turn(message["role"], "".join(parts))
    return text


def encode_prompt(example: Example, tokenizer, image_processor, merge: int, max_pixels: int,
                  min_pixels: int, system: str | None = SYSTEM) -> Prompt:
    """The paper's prompt: one user turn, the image then the question, after the system turn
    (None: no system turn, as Qwen3-VL's template). Several images go where the question's
    "<image>" tags are (else all before it); a conversational prompt (Example.messages) keeps
    its turns, its image parts replaced in order."""
    blocks, pixels, grid = _image_blocks(example.images, image_processor, merge, max_pixels, min_pixels,
                                         example.source)
    if example.messages is not None:
        text = _conversation(example.messages, blocks, system)
    else:
        text = _system_turn(system) + _turn("user", _place_images(example.problem, blocks))
    ids = _token_ids(tokenizer, text + "<|im_start|>assistant\n")
    return Prompt(ids, pixels, grid, example)


def blank_prompt(tokenizer, image_processor, merge: int, min_pixels: int, system: str | None = SYSTEM) -> Prompt:
    """The chat prompt around a black image of about min_pixels and no question: the input
    of filler micro-batches (r1vl.update.engine's lockstep), which must run every module a real
    batch runs, the vision tower included."""
    from PIL import Image

    side = max(1, int(min_pixels ** 0.5))
    block, pixels, grid = _image_block(image_processor, Image.new("RGB", (side, side)), merge)
    text = _system_turn(system) + _turn("user", block) + "<|im_start|>assistant\n"
    ids = _token_ids(tokenizer, text)
    return Prompt(ids, pixels, grid, None)


def encode_solution(solution: str, tokenizer) -> torch.Tensor:
    """(C,) int64: the assistant's answer followed by <|im_end|>, the SFT target."""
    return _token_ids(tokenizer, solution + END)


def encode_sft(example: SFTExample, tokenizer, image_processor, merge: int, max_pixels: int,
               min_pixels: int, system: str | None = SYSTEM) -> tuple[Prompt, torch.Tensor]:
    """A chat-form SFT example as (prompt of every turn before the last assistant turn,
    that turn's ids). Its images go where its image parts are, in order."""
    messages = list(example.messages)
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{example.source}: the last message must be the assistant's")
    blocks, pixels, grid = _image_blocks(example.image_paths, image_processor, merge, max_pixels, min_pixels,
                                         example.source)
    text = _conversation(messages[:-1], blocks, system) + "<|im_start|>assistant\n"
    answer = "".join(p["text"] for p in messages[-1]["content"] if p["type"] == "text")
    ids = _token_ids(tokenizer, text)
    return Prompt(ids, pixels, grid, None), encode_solution(answer, tokenizer)


@dataclass(frozen=True)
class PromptEncoder:
    """The functions above bound to one policy's tokenizer and image processor and the run's
    image size limits: what the trainer passes around instead of five arguments."""

    tokenizer: object
    image_processor: object
    merge: int  # the vision tower's spatial merge size (config.vision_config.spatial_merge_size)
    max_pixels: int
    min_pixels: int
    system: str | None = SYSTEM  # the family's default system turn (r1vl.model.families)

    def prompt(self, example: Example) -> Prompt:
        return encode_prompt(example, self.tokenizer, self.image_processor, self.merge, self.max_pixels,
                             self.min_pixels, self.system)

    def sft(self, example: SFTExample) -> tuple[Prompt, torch.Tensor]:
        return encode_sft(example, self.tokenizer, self.image_processor, self.merge, self.max_pixels,
                          self.min_pixels, self.system)

    def solution(self, example: Example) -> tuple[Prompt, torch.Tensor]:
        """An RL example as an SFT pair: its prompt and its reference solution."""
        return self.prompt(example), encode_solution(example.solution, self.tokenizer)

    def blank(self) -> Prompt:
        return blank_prompt(self.tokenizer, self.image_processor, self.merge, self.min_pixels, self.system)
