"""An independent float64 reference for one StepGRPO update: the gradient of the whole batch.

Written from the formulas (METHOD.md, TRL's GRPO loss), sharing no code with the trainer's
path: every sequence goes through the plain Hugging Face forward on its own (no packing,
no varlen attention, no fused kernel), log-probs from the full logits, advantages from the
rewards by hand, and one loss over the whole batch of every rank's completions:

    ratio_t = exp(logp_t - stop_gradient(logp_t))                  (one iteration: old = current)
    l_t     = -min(ratio_t * A, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A)
              + beta * (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)
    grpo: L = mean over sequences of (mean over the sequence's tokens of l_t)
    dapo: L = sum over all tokens of l_t / (all completion tokens)
"""
from __future__ import annotations

import copy
import math

import torch


def group_advantages(rewards: list[float], group_size: int, eps: float = 1e-4) -> list[float]:
    """(r - group mean) / (unbiased group std + eps), group by group."""
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        out += [(r - mean) / (std + eps) for r in group]
    return out


def _completion_logprobs(model, sequence, temperature: float) -> torch.Tensor:
    prompt, completion = sequence.prompt_ids, sequence.completion_ids
    ids = torch.cat([prompt, completion])[None]
    types = (ids == model.config.image_token_id).to(torch.int32)
    out = model(input_ids=ids, mm_token_type_ids=types, pixel_values=sequence.pixel_values.double(),
                image_grid_thw=sequence.image_grid_thw)
    P, C = prompt.numel(), completion.numel()
    logits = out.logits[0, P - 1:P + C - 1].double() / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, completion[:, None])[:, 0]


def full_batch_gradient(model, ref_model, sequences, advantages: list[float], *, temperature: float, beta: float,
                        loss_type: str, eps_low: float = 0.2, eps_high: float = 0.2) -> dict[str, torch.Tensor]:
    """{parameter name: d L / d parameter} in float64 for the whole batch `sequences` (every
    rank's), advantages one per sequence. The models are copied, not changed."""
    policy = copy.deepcopy(model).double().eval()
    reference = copy.deepcopy(ref_model).double().eval()
    policy.set_attn_implementation("sdpa")
    reference.set_attn_implementation("sdpa")
    S, N = len(sequences), sum(s.completion_ids.numel() for s in sequences)
    total = torch.zeros((), dtype=torch.float64)
    for sequence, a in zip(sequences, advantages):
        logp = _completion_logprobs(policy, sequence, temperature)
        with torch.no_grad():
            ref = _completion_logprobs(reference, sequence, temperature)
        ratio = torch.exp(logp - logp.detach())
        clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
        per_token = -torch.minimum(ratio * a, clipped * a) + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
        if loss_type == "grpo":
            total = total + per_token.mean() / S
        elif loss_type == "dapo":
            total = total + per_token.sum() / N
        else:
            raise ValueError(loss_type)
    total.backward()
    return {name: p.grad.detach().clone() for name, p in policy.named_parameters() if p.grad is not None}
