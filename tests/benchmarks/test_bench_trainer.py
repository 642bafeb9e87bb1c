"""The trainer benchmark's fairness conditions: TRL is handed the very prompt tokens and pixels
train.py builds, its completions come out at the forced length, the 2B shape is Qwen2-VL-2B's,
and the reported step is a real post-warm-up step. The TRL run is skipped without trl."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_trainer  # noqa: E402
import trl_trainer_driver  # noqa: E402

from r1vl.data.prompts import encode_prompt  # noqa: E402
from r1vl.data.records import load_examples  # noqa: E402
from r1vl.data.synthetic import write_dataset  # noqa: E402
from r1vl.model.policy import load_policy  # noqa: E402
from r1vl.tiny import build_tokenizer, write_tiny_checkpoint  # noqa: E402

PIXELS = 56 * 56


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    data = write_dataset(root / "data", n=8, seed=0)
    examples = load_examples(data).items
    model_dir = write_tiny_checkpoint(root / "model", [e.problem for e in examples] + [e.solution for e in examples],
                                      max_pixels=PIXELS, min_pixels=PIXELS)
    return data, model_dir, examples


def test_trl_sees_the_prompt_tokens_and_pixels_train_py_builds(tiny):
    data, model_dir, examples = tiny
    processor = trl_trainer_driver.build_processor(str(model_dir), PIXELS, PIXELS)
    policy = load_policy(model_dir, torch.float32, torch.device("cpu"), PIXELS, PIXELS)
    for example, row in zip(examples, trl_trainer_driver.trl_records(str(data), PIXELS, PIXELS)):
        ours = encode_prompt(example, policy.tokenizer, policy.image_processor, 2, PIXELS, PIXELS)
        # TRL's form after prepare_multimodal_messages: the image part before the question.
        messages = [{"role": "user", "content": [{"type": "image", "image": row["image"]},
                                                 {"type": "text", "text": row["prompt"][0]["content"]}]}]
        theirs = processor.apply_chat_template(conversation=[messages], add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        assert theirs["input_ids"][0].tolist() == ours.ids.tolist()
        assert torch.equal(theirs["image_grid_thw"], ours.image_grid_thw)
        torch.testing.assert_close(theirs["pixel_values"].float(), ours.pixel_values)


def test_2b_shape_is_qwen2_vl_2b():
    from transformers import Qwen2VLForConditionalGeneration

    tokenizer = build_tokenizer(["a small corpus for the tokenizer"], vocab_size=300)
    config = bench_trainer.qwen2_vl_2b_config(tokenizer)
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    # Qwen2-VL-2B-Instruct: 2,208,985,600 parameters (lm_head tied to the embedding).
    assert sum(p.numel() for p in model.parameters()) == 2_208_985_600
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>") < config.text_config.vocab_size


def test_median_step_is_a_real_step_after_the_warmup():
    records = [{"step": i, "time_step": t} for i, t in enumerate([9.0, 3.0, 1.0, 2.0, 5.0], start=1)]
    assert bench_trainer.median_step(bench_trainer.after_warmup(records, 1))["step"] == 4  # 2.0 of 1, 2, 3, 5
    assert bench_trainer.median_step(bench_trainer.after_warmup(records, 2))["step"] == 4  # 2.0 of 1, 2, 5
    with pytest.raises(ValueError, match="warm-up"):
        bench_trainer.after_warmup(records[:1], 1)


def test_trl_driver_forces_the_completion_length_and_times_every_phase(tiny, tmp_path):
    pytest.importorskip("trl")
    data, model_dir, _ = tiny
    out = tmp_path / "steps.jsonl"
    trl_trainer_driver.main(["--model", str(model_dir), "--data", str(data), "--out", str(out), "--num_steps", "2",
                             "--num_generations", "2", "--batch_size", "4", "--max_completion_length", "6",
                             "--device", "cpu", "--min_pixels", str(PIXELS), "--max_pixels", str(PIXELS)])
    steps = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    for s in steps:
        assert s["completion_len"] == 6 and s["completion_tokens"] == 4 * 6
        assert s["prompt_tokens"] > 4 * 4  # image placeholders included
        assert 0 < s["time_generate"] <= s["time_rollout"] < s["time_step"]
        assert s["time_reference"] > 0 and s["time_update"] > 0
        assert s["tokens_per_s"] == pytest.approx((s["prompt_tokens"] + s["completion_tokens"]) / s["time_step"])
