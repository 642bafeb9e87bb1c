"""The trainer's prompt encoder (r1vl.sampling.sampler.prompt_encoder), built as train.py builds
it from a checkpoint of each family: the prompt opens with the family's chat-template system
turn, Qwen2-VL's "You are a helpful assistant." for Qwen2-VL and none for Qwen3-VL (whose
template adds none), so a Qwen3-VL policy never trains on Qwen2-VL's prompt."""
import types

import pytest
import torch

from r1vl.data.records import load_examples
from r1vl.data.synthetic import write_dataset
from r1vl.model.policy import load_policy
from r1vl.sampling.sampler import prompt_encoder
from r1vl.tiny import write_tiny_checkpoint

PIXELS = 56 * 56


def _layout(system: str | None, image_tokens: int, question: str) -> str:
    """One user turn (the image, then the question) after the system turn if any, as the
    Qwen2-VL / Qwen3-VL chat templates lay it out with add_generation_prompt."""
    head = "" if system is None else f"<|im_start|>system\n{system}<|im_end|>\n"
    return (head + "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * image_tokens + "<|vision_end|>"
            + question + "<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("family, system", [("qwen2_vl", "You are a helpful assistant."), ("qwen3_vl", None)])
def test_trainers_encoder_uses_the_familys_system_turn(tmp_path, family, system):
    examples = load_examples(write_dataset(tmp_path / "data", n=2, seed=0)).items
    model_dir = write_tiny_checkpoint(tmp_path / "model", [e.problem for e in examples], family=family,
                                      max_pixels=PIXELS, min_pixels=PIXELS)
    policy = load_policy(model_dir, torch.float32, torch.device("cpu"), PIXELS, PIXELS)
    assert policy.model.config.model_type == family
    encoder = prompt_encoder(policy, types.SimpleNamespace(min_pixels=PIXELS, max_pixels=PIXELS))
    prompt = encoder.prompt(examples[0])
    n = int(prompt.image_grid_thw.prod()) // 4
    text = policy.tokenizer.decode(prompt.ids, skip_special_tokens=False)
    assert text == _layout(system, n, examples[0].problem), text[:120]
    assert prompt.ids.tolist() == policy.tokenizer(_layout(system, n, examples[0].problem),
                                                   add_special_tokens=False)["input_ids"]
