"""Stage 1 of a StepGRPO step: encode a batch of examples, sample G completions per prompt.

    sampler = Sampler(policy, cfg, generator)
    rollout = sampler.sample(examples)        # Rollout: prompts, completion ids and texts

A prompt longer than max_prompt_length is skipped and counted, never cut: cutting would drop
image tokens. Everything a sampler needs (the policy, the prompt encoder, the EOS ids, the
random generator) it holds, so the loop calls it with the examples alone.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from r1vl.data.prompts import Prompt, PromptEncoder
from r1vl.model.families import family_of
from r1vl.model.policy import Policy, eos_token_ids
from r1vl.sampling.generate import Completions, generate


@dataclass
class Rollout:
    """G sampled completions for each kept prompt of one batch, prompt-major (p*G + g): P groups."""

    prompts: list[Prompt]  # P kept prompts (with their examples)
    completions: Completions  # P*G completion ids, whether each stopped, the decode work
    texts: list[str]  # P*G completions decoded, special tokens dropped
    group_size: int  # G
    skipped: int  # prompts over max_prompt_length, not sampled

    def prompt_of(self, i: int) -> Prompt:
        """The prompt of completion i."""
        return self.prompts[i // self.group_size]

    def groups(self) -> list[list[str]]:
        """The texts as P lists of G."""
        G = self.group_size
        return [self.texts[p * G:(p + 1) * G] for p in range(len(self.prompts))]


def prompt_encoder(policy: Policy, cfg) -> PromptEncoder:
    """The run's prompt encoder for `policy` (cfg: min_pixels, max_pixels)."""
    merge = policy.model.config.vision_config.spatial_merge_size
    return PromptEncoder(policy.tokenizer, policy.image_processor, merge, cfg.max_pixels, cfg.min_pixels,
                         family_of(policy.model).default_system)


class Sampler:
    """Samples completions from `policy` with the run's settings.

    cfg: num_generations, max_prompt_length, max_completion_length, ignore_eos, temperature,
    top_p, min_pixels, max_pixels. generator: the random stream of the draws, on the policy's
    device (a checkpoint saves and restores it).
    """

    def __init__(self, policy: Policy, cfg, generator: torch.Generator):
        self.policy, self.cfg, self.generator = policy, cfg, generator
        self.encoder = prompt_encoder(policy, cfg)
        self.eos_ids = eos_token_ids(policy.tokenizer)

    def with_settings(self, generator: torch.Generator, num_generations: int) -> Sampler:
        """The same sampler with another random stream and group size (held-out evaluation)."""
        return Sampler(self.policy, dataclasses.replace(self.cfg, num_generations=num_generations), generator)

    def sample(self, examples) -> Rollout:
        """Encode `examples` and sample cfg.num_generations completions for each."""
        cfg = self.cfg
        prompts, skipped = [], 0
        for example in examples:
            prompt = self.encoder.prompt(example)
            if prompt.ids.numel() > cfg.max_prompt_length:
                skipped += 1  # cutting would drop image tokens; skip and count instead
            else:
                prompts.append(prompt)
        completions = generate(self.policy.model, prompts, cfg.num_generations, cfg.max_completion_length,
                               [] if cfg.ignore_eos else self.eos_ids,
                               temperature=cfg.temperature, top_p=cfg.top_p, generator=self.generator)
        texts = [self.policy.tokenizer.decode(ids, skip_special_tokens=True) for ids in completions.ids]
        return Rollout(prompts, completions, texts, cfg.num_generations, skipped)
