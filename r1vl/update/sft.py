"""The supervised warm-up's update: cross-entropy on the assistant tokens of structured
solutions, one optimizer step per batch of examples.

    update = SFTUpdate(policy, cfg.sft, cfg.optimizer, cfg.memory, world, encode, idle)
    numbers = update(examples)      # loss, grad_norm, lr, tokens (summed over ranks)
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from r1vl import distributed
from r1vl.config import MemoryOptions, OptimizerOptions, SFTOptions
from r1vl.model.policy import Policy
from r1vl.update.choose_engine import make_engine
from r1vl.update.losses import sft_loss_sum
from r1vl.update.microbatches import plan_batch
from r1vl.update.packing import Sequence


class SFTUpdate:
    """options: sft_lr, sft_steps; optimizer: the engine's (its lr is the GRPO stage's, not
    used here); memory: micro_batch_tokens, share_prompts. encode: example -> (prompt, target
    ids); idle: what a rank with fewer micro-batches runs, weighted 0."""

    def __init__(self, policy: Policy, options: SFTOptions, optimizer: OptimizerOptions, memory: MemoryOptions,
                 world: distributed.Dist, encode: Callable, idle: Sequence):
        self.model, self.memory, self.world, self.encode = policy.model, memory, world, encode
        self.engine = make_engine(policy.model, optimizer, options.sft_lr, options.sft_steps, world, idle)

    def __call__(self, examples) -> dict:
        """One optimizer step on `examples`; a pair longer than micro_batch_tokens is left out."""
        memory, world, engine = self.memory, self.world, self.engine
        sequences = []
        for prompt, target in map(self.encode, examples):
            if prompt.ids.numel() + target.numel() <= memory.micro_batch_tokens:
                sequences.append(Sequence(prompt.ids, target, prompt.pixel_values, prompt.image_grid_thw))
        n_tokens = distributed.all_reduce_sum([sum(len(s.completion_ids) for s in sequences)], world.device)[0]
        # Summed on the device and read back once per step: no host sync per micro-batch.
        loss_sum = torch.zeros((), device=world.device)
        batch = plan_batch(sequences, None, 1, self.model, memory, world.device)
        for mb, packed in engine.lockstep([(mb, mb.packed) for mb in batch.microbatches]):
            loss = engine.forward(sft_loss_sum, packed) / n_tokens * (0.0 if mb is None else 1.0)
            engine.backward(loss)
            loss_sum += loss.detach()
        loss_sum = float(loss_sum)
        grad_norm = engine.step(math.isfinite(loss_sum))
        return {"loss": distributed.all_reduce_sum([loss_sum], world.device)[0], "grad_norm": grad_norm,
                "lr": engine.lr, "tokens": n_tokens}
