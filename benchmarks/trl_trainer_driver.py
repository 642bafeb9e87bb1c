"""TRL's GRPOTrainer on a local Qwen2-VL checkpoint, timed per optimizer step: the baseline that
benchmarks/bench_trainer.py runs r1vl's trainer against (in its own process, so that neither
side's imports, allocator or threads touch the other's figures).

    python benchmarks/trl_trainer_driver.py --model DIR --data data.jsonl --out steps.jsonl \\
        --num_steps 6 --num_generations 4 --batch_size 16 --max_completion_length 128 --dtype float32

The settings mirror train.py's options of the same names: G = --num_generations, --batch_size
completions per optimizer step (per_device_train_batch_size, one generation per step:
gradient_accumulation_steps = steps_per_generation = 1), beta, learning rate (constant, no
warm-up), loss_type, temperature, clip range 0.2 / 0.2, one optimizer step per rollout
(num_iterations = 1), AdamW (0.9, 0.999, no weight decay), gradient norm clipped at 1.0, no
gradient checkpointing (train.py has none), parameters in --dtype (bf16 autocast on as well
when it is bfloat16). Every completion is exactly --max_completion_length tokens:
generation_kwargs min_new_tokens forbids the EOS tokens until then, as --ignore_eos does for
train.py. The reward is a seeded random number per completion (cheaper than any real reward;
its time is logged as time_reward).

Data: r1vl's RL records (e.g. r1vl.data.synthetic.write_dataset) as TRL's conversational VLM
dataset: {"prompt": [{"role": "user", "content": problem}], "image": PIL image}. The chat
template below lays the prompt out exactly as r1vl.data.prompts.encode_prompt does, and the image
processor is the checkpoint's Qwen2VLImageProcessorPil with the same min/max_pixels, so both
trainers see the same prompt tokens.

One JSON line per optimizer step goes to --out:
    step; time_step (s, from the previous step's end to this one's, optimizer step included);
    time_generate (s: tokenizing, model.generate, decoding); time_reward (s, the reward call);
    time_reference (s, the reference model's log-probs); time_rollout (s, the rest of TRL's
    _generate_and_score_completions: generation, rewards, advantages, the second image pass);
    time_update (s, time_step - time_rollout - time_reference: the policy forward + backward,
    the optimizer step, the Trainer's batch fetch and logging); prompt_tokens and
    completion_tokens (the step's sequences, image placeholders included); tokens_per_s
    ((prompt + completion tokens) / time_step, as train.py computes it); completion_len (mean
    tokens per completion); peak_memory_gb (r1vl.run.metrics.peak_memory_gb:
    torch.cuda.max_memory_allocated on GPU, the process's peak resident set size on CPU, both
    since the process started).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from r1vl.data.prompts import SYSTEM
from r1vl.data.records import load_examples, load_image
from r1vl.run.metrics import peak_memory_gb

# Qwen2-VL's chat layout as r1vl.data.prompts writes it: a default system turn, then each message;
# an image part becomes <|vision_start|><|image_pad|><|vision_end|>, which the processor then
# expands to one <|image_pad|> per merged patch.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + SYSTEM + "<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor.

    transformers builds every sub-processor named in a processor's __init__ signature, and
    Qwen2-VL's video processor requires torchvision, which has no CPU build here (the
    constructor fails with "VIDEO_PROCESSOR_MAPPING has no attribute _extra_content";
    huggingface/transformers#48558). Leaving video_processor out of the signature builds the
    processor from the image processor and tokenizer alone; TRL only passes images.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def build_processor(model_dir: str, min_pixels: int, max_pixels: int) -> ImageOnlyQwen2VLProcessor:
    """The processor TRL gets: the checkpoint's tokenizer (left padding, as TRL requires) and PIL
    image processor with the trainer's pixel bounds, and CHAT_TEMPLATE."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, padding_side="left")
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(
        model_dir, local_files_only=True, min_pixels=min_pixels, max_pixels=max_pixels)
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     chat_template=CHAT_TEMPLATE)


def trl_records(data: str, min_pixels: int, max_pixels: int) -> list[dict]:
    """r1vl RL records -> TRL's conversational VLM rows; images loaded (and resized) by r1vl."""
    return [{"prompt": [{"role": "user", "content": ex.problem}],
             "image": load_image(ex.image_path, max_pixels=max_pixels, min_pixels=min_pixels)}
            for ex in load_examples(data).items]


# -------------------------------------------------------------------------------- timing


class PhaseClock:
    """Seconds per phase since the last pop; on CUDA each phase starts and ends with a sync so
    that it is charged for its own kernels only."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, phase: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - start

    def count(self, name: str, value: float) -> None:
        self.counts[name] = self.counts.get(name, 0.0) + value

    def pop(self) -> tuple[dict[str, float], dict[str, float]]:
        out = (self.totals, self.counts)
        self.totals, self.counts = {}, {}
        return out


def timed_trainer_class():
    """GRPOTrainer with its phases timed (imported here: trl is optional for the project)."""
    from trl import GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        clock: PhaseClock

        def _generate_and_score_completions(self, inputs):
            with self.clock("score"):
                return super()._generate_and_score_completions(inputs)

        def _generate(self, prompts):
            with self.clock("generate"):
                out = super()._generate(prompts)
            prompt_ids, completion_ids = out[0], out[1]  # one entry per completion (G repeats per prompt)
            self.clock.count("prompt_tokens", sum(len(ids) for ids in prompt_ids))
            self.clock.count("completion_tokens", sum(len(ids) for ids in completion_ids))
            self.clock.count("completions", len(completion_ids))
            return out

        def _calculate_rewards(self, *args, **kwargs):
            with self.clock("reward"):
                return super()._calculate_rewards(*args, **kwargs)

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            if torch.is_grad_enabled():  # the policy's training forward: part of the update
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)
            with self.clock("reference"):  # reference (and old-policy) log-probs
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)

    return TimedGRPOTrainer


def step_logger(trainer, out_path: Path):
    """A TrainerCallback writing one JSON line per optimizer step (see the module docstring)."""
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            trainer.clock._sync()
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            trainer.clock._sync()
            now = time.perf_counter()
            seconds, self.last = now - self.last, now
            phases, counts = trainer.clock.pop()
            reference = phases.get("reference", 0.0)
            rollout = phases.get("score", 0.0) - reference  # the reference pass runs inside it
            tokens = counts.get("prompt_tokens", 0) + counts.get("completion_tokens", 0)
            record = {
                "step": state.global_step, "time_step": seconds, "time_rollout": rollout,
                "time_reference": reference, "time_update": seconds - rollout - reference,
                "time_generate": phases.get("generate", 0.0), "time_reward": phases.get("reward", 0.0),
                "prompt_tokens": counts.get("prompt_tokens", 0),
                "completion_tokens": counts.get("completion_tokens", 0),
                "completion_len": counts.get("completion_tokens", 0) / max(counts.get("completions", 1), 1),
                "tokens_per_s": tokens / seconds, "peak_memory_gb": peak_memory_gb(trainer.clock.device),
            }
            with open(out_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    return StepLog()


# -------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local Qwen2-VL checkpoint directory")
    parser.add_argument("--data", required=True, help="r1vl RL records (JSONL)")
    parser.add_argument("--out", required=True, help="JSONL file, one line per optimizer step (appended)")
    parser.add_argument("--num_steps", type=int, default=6)
    parser.add_argument("--num_generations", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=16, help="completions per optimizer step")
    parser.add_argument("--max_completion_length", type=int, default=128)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--loss_type", default="grpo")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--min_pixels", type=int, default=3136)
    parser.add_argument("--max_pixels", type=int, default=3136)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda if available")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from trl import GRPOConfig

    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    rng = random.Random(args.seed)

    def random_reward(completions, **kwargs):
        return [rng.random() for _ in completions]

    config = GRPOConfig(
        output_dir=str(Path(args.out).parent / "trl-output"), max_steps=args.num_steps, seed=args.seed,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        generation_kwargs={"min_new_tokens": args.max_completion_length},  # no EOS before the end
        temperature=args.temperature, top_p=1.0, beta=args.beta, loss_type=args.loss_type,
        epsilon=0.2, epsilon_high=0.2, num_iterations=1, scale_rewards="group", mask_truncated_completions=False,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
        bf16=args.dtype == "bfloat16", fp16=False, gradient_checkpointing=False,
        model_init_kwargs={"dtype": args.dtype, "attn_implementation": "sdpa"},
        use_cpu=device.type == "cpu", logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0,
    )
    processor = build_processor(args.model, args.min_pixels, args.max_pixels)
    dataset = Dataset.from_list(trl_records(args.data, args.min_pixels, args.max_pixels))
    trainer = timed_trainer_class()(model=args.model, reward_funcs=random_reward, args=config,
                                    train_dataset=dataset, processing_class=processor)
    trainer.clock = PhaseClock(device)
    trainer.add_callback(step_logger(trainer, Path(args.out)))
    trainer.train()


if __name__ == "__main__":
    main()
