"""Stage 1 of a StepGRPO step: encode a batch of examples, sample G completions per prompt.

    sampler = Sampler(policy, cfg.sampling, prompt_encoder(policy, cfg.dataset), generator)
    rollout = sampler.sample(examples)        # Rollout: prompts, completion ids and texts

A prompt longer than max_prompt_length is skipped and counted, never cut: cutting would drop
image tokens. Everything a sampler needs (the policy, the prompt encoder, the EOS ids, the
random generator) it holds, so the loop calls it with the examples alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from r1vl.config import DataOptions, SamplingOptions
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


def prompt_encoder(policy: Policy, dataset: DataOptions) -> PromptEncoder:
    """The run's prompt encoder for `policy` (dataset: min_pixels, max_pixels)."""
    merge = policy.model.config.vision_config.spatial_merge_size
    return PromptEncoder(policy.tokenizer, policy.image_processor, merge, dataset.max_pixels, dataset.min_pixels,
                         family_of(policy.model).default_system)


class Sampler:
    """Samples completions from `policy` with the run's settings.

    options: num_generations (G, unless group_size is given), max_prompt_length,
    max_completion_length, ignore_eos, temperature, top_p. encoder: the run's prompt encoder
    (prompt_encoder). generator: the random stream of the draws, on the policy's device (a
    checkpoint saves and restores it).
    """

    def __init__(self, policy: Policy, options: SamplingOptions, encoder: PromptEncoder, generator: torch.Generator,
                 group_size: int | None = None):
        self.policy, self.options, self.encoder, self.generator = policy, options, encoder, generator
        self.group_size = group_size or options.num_generations
        self.eos_ids = eos_token_ids(policy.tokenizer)

    def with_settings(self, generator: torch.Generator, num_generations: int) -> Sampler:
        """The same sampler with another random stream and group size (held-out evaluation)."""
        return Sampler(self.policy, self.options, self.encoder, generator, num_generations)

    def sample(self, examples) -> Rollout:
        """Encode `examples` and sample group_size completions for each."""
        options = self.options
        prompts, skipped = [], 0
        for example in examples:
            prompt = self.encoder.prompt(example)
            if prompt.ids.numel() > options.max_prompt_length:
                skipped += 1  # cutting would drop image tokens; skip and count instead
            else:
                prompts.append(prompt)
        completions = generate(self.policy.model, prompts, self.group_size, options.max_completion_length,
                               [] if options.ignore_eos else self.eos_ids,
                               temperature=options.temperature, top_p=options.top_p, generator=self.generator)
        texts = [self.policy.tokenizer.decode(ids, skip_special_tokens=True) for ids in completions.ids]
        return Rollout(prompts, completions, texts, self.group_size, skipped)
