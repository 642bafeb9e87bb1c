"""Prompts with several images: each image's block where its tag or part is, as the Qwen chat
template lays them out; the processor's pixels and grids of each image, in order."""
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from r1vl.data.prompts import SYSTEM, encode_prompt, encode_sft
from r1vl.data.records import Example, SFTExample
from r1vl.tiny import build_tokenizer

PAD, START, END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"


def _setup():
    tokenizer = build_tokenizer(["first question", "then this", "answer"], vocab_size=300)
    processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56)
    images = (Image.new("RGB", (56, 28), "red"), Image.new("RGB", (28, 56), "blue"))
    return tokenizer, processor, images


def _expected(tokenizer, processor, images, user: list) -> tuple[list, torch.Tensor, torch.Tensor]:
    """The ids of the chat text with each image's block in place, and the processor's own
    pixel rows and grids for the list of images."""
    out = processor(images=list(images), return_tensors="pt")
    blocks = [START + PAD * (int(g.prod()) // 4) + END for g in out["image_grid_thw"]]
    text = "".join(blocks[p] if isinstance(p, int) else p for p in user)
    text = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"], out["pixel_values"], out["image_grid_thw"]


def test_two_tagged_images_go_where_their_tags_are():
    tokenizer, processor, images = _setup()
    example = Example(image_path=None, problem="first question<image> then this<image>", solution="answer",
                      images=images)
    prompt = encode_prompt(example, tokenizer, processor, 2, 56 * 56, 28 * 28)
    ids, pixels, grids = _expected(tokenizer, processor, images, ["first question", 0, " then this", 1])
    assert prompt.ids.tolist() == ids
    assert torch.equal(prompt.image_grid_thw, grids) and prompt.image_grid_thw.tolist() == [[1, 2, 4], [1, 4, 2]]
    torch.testing.assert_close(prompt.pixel_values, pixels.float(), rtol=0, atol=0)


def test_untagged_images_go_before_the_question_and_a_conversation_keeps_its_parts():
    tokenizer, processor, images = _setup()
    untagged = encode_prompt(Example(image_path=None, problem="first question", solution="a", images=images),
                             tokenizer, processor, 2, 56 * 56, 28 * 28)
    assert untagged.ids.tolist() == _expected(tokenizer, processor, images, [0, 1, "first question"])[0]
    messages = ({"role": "user", "content": [{"type": "text", "text": "first question"}, {"type": "image"},
                                             {"type": "image"}]},)
    chat = encode_prompt(Example(image_path=None, problem="first question", solution="a", images=images,
                                 messages=messages), tokenizer, processor, 2, 56 * 56, 28 * 28)
    assert chat.ids.tolist() == _expected(tokenizer, processor, images, ["first question", 0, 1])[0]


def test_sft_conversation_with_two_images(tmp_path):
    tokenizer, processor, images = _setup()
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    example = SFTExample(messages=(
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "first question"},
                                     {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "answer"}]}), image_paths=tuple(paths))
    prompt, target = encode_sft(example, tokenizer, processor, 2, 56 * 56, 28 * 28)
    ids, _, grids = _expected(tokenizer, processor, images, [0, "first question", 1])
    assert prompt.ids.tolist() == ids and torch.equal(prompt.image_grid_thw, grids)
    assert tokenizer.decode(target) == "answer<|im_end|>"
