"""r1vl.data.prompts against transformers' own processors: the prompt ids, image grid and pixels
of an image whose sides are multiples of neither 28 nor 32 are those that Qwen2VLProcessor /
Qwen3VLProcessor.apply_chat_template builds from the original image. The resize factor is the
processor's patch x merge (28 for Qwen2-VL, 32 for Qwen3-VL): a factor of 28 for Qwen3-VL
turns a 75x75 image into 84x84, which the processor then takes to 96x96 (a 6x6 grid instead of
4x4), so the grid, the pixels and the number of image tokens all differ."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLProcessor, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)

from r1vl.data.prompts import encode_prompt
from r1vl.data.records import Example
from r1vl.model.families import FAMILIES
from r1vl.tiny import build_tokenizer

QUESTION = "How many shapes are there?"
MIN_PIXELS, MAX_PIXELS = 32 * 32, 128 * 128
# The processors as the checkpoints configure them (Qwen3-VL: 16-pixel patches, pixels scaled
# to [-1, 1]); merge 2 for both.
PROCESSORS = {
    "qwen2_vl": (Qwen2VLProcessor, {"patch_size": 14}),
    "qwen3_vl": (Qwen3VLProcessor, {"patch_size": 16, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}),
}


def _chat_template(system: str | None) -> str:
    """The layout of the family's chat template for one user turn of image parts and text:
    the default system turn when the conversation has none (Qwen2-VL's), or none (Qwen3-VL's);
    an image part is <|vision_start|><|image_pad|><|vision_end|>, which the processor expands
    to one <|image_pad|> per merged patch of the grid it computed."""
    head = "" if system is None else (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + system + "<|im_end|>\n{% endif %}")
    return head + (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _processor(family: str, tokenizer):
    """transformers' processor of `family` from its image processor and tokenizer alone: the
    video processor needs torchvision, which has no CPU build here (ENVIRONMENT.md), so it
    is left out of the constructor (only images are passed)."""
    cls, options = PROCESSORS[family]

    class ImageOnly(cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, **options)
    return ImageOnly(image_processor=image_processor, tokenizer=tokenizer,
                     chat_template=_chat_template(FAMILIES[family].default_system))


@pytest.mark.parametrize("family, grid", [("qwen2_vl", (1, 6, 6)), ("qwen3_vl", (1, 4, 4))])
def test_prompt_is_the_processors_for_an_image_of_odd_size(tmp_path, family, grid):
    """75x75: smart_resize takes it to 84x84 with factor 28 (Qwen2-VL, 14-pixel patches: a
    6x6 grid) and to 64x64 with factor 32 (Qwen3-VL, 16-pixel patches: 4x4)."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (75, 75, 3), dtype=np.uint8))
    image.save(tmp_path / "odd.png")
    tokenizer = build_tokenizer([QUESTION], vocab_size=300)
    processor = _processor(family, tokenizer)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    theirs = processor.apply_chat_template([messages], add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    ours = encode_prompt(Example(tmp_path / "odd.png", QUESTION, "3"), tokenizer, processor.image_processor, 2,
                         MAX_PIXELS, MIN_PIXELS, FAMILIES[family].default_system)
    assert theirs["image_grid_thw"].tolist() == [list(grid)]
    assert ours.image_grid_thw.tolist() == [list(grid)], (family, ours.image_grid_thw.tolist())
    assert ours.ids.tolist() == theirs["input_ids"][0].tolist()
    assert int((ours.ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == grid[1] * grid[2] // 4
    torch.testing.assert_close(ours.pixel_values, theirs["pixel_values"].float(), rtol=0, atol=0)
