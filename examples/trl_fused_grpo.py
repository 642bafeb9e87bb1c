"""Train a tiny random model with TRL's GRPOTrainer and r1vl's fused loss, on the CPU.

    python examples/trl_fused_grpo.py            # about a minute on two CPU cores

The only change from a plain TRL script is the trainer class:

    from trl import GRPOTrainer                       ->  from r1vl_kernels.trl import FusedGRPOTrainer
    trainer = GRPOTrainer(model=..., ...)             ->  trainer = FusedGRPOTrainer(model=..., ...)

The loss is then computed from the final hidden states and the lm_head weight by
r1vl_kernels.grpo_loss_from_hidden: no logits, forward or backward. The model and tokenizer
here are built offline (a byte-level BPE trained on the prompts, a 2-layer Qwen2); with a
real checkpoint, pass its path as usual. The reward favours completions
with many digits, so the mean reward should rise over the steps.
"""
import argparse
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM
from trl import GRPOConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # r1vl.tiny, for the offline tokenizer
from r1vl.tiny import build_tokenizer  # noqa: E402
from r1vl_kernels.trl import FusedGRPOTrainer  # noqa: E402

PROMPTS = ["Count to ten:", "Write a number:", "List some digits:", "What is 12 + 30?"]


def digit_reward(completions, **kwargs):
    """Share of characters that are digits, per completion."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--loss_type", default="dapo")
    parser.add_argument("--output_dir", default="runs/trl_fused_grpo")
    args = parser.parse_args()

    tokenizer = build_tokenizer(PROMPTS * 8 + ["0 1 2 3 4 5 6 7 8 9 10 42"] * 8, vocab_size=320)
    tokenizer.padding_side = "left"  # TRL requires left padding
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model_dir = Path(args.output_dir) / "tiny_model"  # TRL loads the KL reference from a path
    Qwen2ForCausalLM(config).save_pretrained(model_dir)

    config = GRPOConfig(output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=8,
                        num_generations=4, max_completion_length=16, learning_rate=3e-3, beta=0.04,
                        loss_type=args.loss_type, use_cpu=True, bf16=False, logging_steps=1,
                        report_to="none", save_strategy="no")
    trainer = FusedGRPOTrainer(model=str(model_dir), reward_funcs=digit_reward, args=config,
                               train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS] * 16),
                               processing_class=tokenizer)
    trainer.train()
    rewards = [log["reward"] for log in trainer.state.log_history if "reward" in log]
    print(f"mean reward per step: {', '.join(f'{r:.3f}' for r in rewards)}")


if __name__ == "__main__":
    main()
