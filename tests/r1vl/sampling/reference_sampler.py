"""The reference sampler: the test oracle and benchmark baseline of r1vl.sampling.generate.generate.

It was the trainer's sampler until the fast one (r1vl.sampling.generate) replaced it; the fast one never
imports it. Plain transformers forwards with a DynamicCache that grows by concatenation,
every sequence decoded until the longest stops, torch.multinomial draws.

G completions per prompt with a KV cache, the image encoded once per prompt.

For each prompt, one prefill forward runs the vision tower and the prompt through the
language model (HF `generate` with num_return_sequences=G would encode the image G
times). The prompts' caches are then left-padded to a common length, each repeated G times,
and all P*G sequences decode together, one token per forward. A sequence stops at an EOS
token (kept as its last completion token, so that the policy learns to stop) or at
max_new_tokens; the loop ends when every sequence has stopped.

Positions follow Qwen2-VL's M-RoPE: the prefill takes the model's own rope index, and the
k-th sampled token sits at position P + k + delta on all three axes, delta being the
prompt's rope offset (images make the M-RoPE positions lag the token count).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from r1vl.data.prompts import Prompt
from r1vl.model.attention import sdpa_attention
from r1vl.sampling.generate import Completions


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """(B, V) fp32 logits -> (B,) int64 token ids from softmax(logits / T), nucleus-truncated."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _batched_cache(caches: list[DynamicCache], lengths: list[int], repeats: int) -> DynamicCache:
    """Per-prompt caches (1, H, P_i, D) per layer -> one cache (P*repeats, H, L, D), each
    prompt left-padded to L = max P_i (the padding is masked out) and repeated."""
    longest = max(lengths)
    layers = []
    for layer in range(len(caches[0].layers)):
        keys, values = [], []
        for cache, n in zip(caches, lengths):
            k, v = cache.layers[layer].keys, cache.layers[layer].values
            keys.append(F.pad(k, (0, 0, longest - n, 0)).expand(repeats, -1, -1, -1))
            values.append(F.pad(v, (0, 0, longest - n, 0)).expand(repeats, -1, -1, -1))
        layers.append((torch.cat(keys), torch.cat(values)))
    return DynamicCache(ddp_cache_data=layers)


@torch.no_grad()
def generate_reference(
    model: torch.nn.Module,
    prompts: list[Prompt],
    num_generations: int,
    max_new_tokens: int,
    eos_token_ids: list[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Completions:
    """Sample `num_generations` completions for each prompt.

    Args:
        model: Qwen2-VL / Qwen2.5-VL ForConditionalGeneration, on its device.
        prompts: encoded prompts (r1vl.data.prompts), each with one image or several.
        eos_token_ids: tokens that end a completion (e.g. <|im_end|>, <|endoftext|>); an empty list
            never stops early: every completion is exactly max_new_tokens long (benchmarks).
        temperature, top_p: sampling from softmax(logits / temperature), nucleus top_p.
        generator: for reproducible draws, on the model's device.

    Image and vision-marker tokens are never sampled: a completion holding an image token
    would have no image features behind it.
    """
    if not prompts:
        return Completions([], torch.zeros(0, dtype=torch.bool))
    base, lm_head = model.model, model.lm_head
    config = model.config
    device = lm_head.weight.device
    G = num_generations
    banned = torch.tensor([config.image_token_id, config.video_token_id, config.vision_start_token_id,
                           config.vision_end_token_id], device=device)
    eos = torch.tensor(eos_token_ids, dtype=torch.int64, device=device)  # int64 even when empty (no stop)

    with sdpa_attention(model):
        # 1. Prefill each prompt alone: the image goes through the tower exactly once.
        caches, lengths, deltas, first_logits = [], [], [], []
        for prompt in prompts:
            ids = prompt.ids[None].to(device)
            types = (ids == config.image_token_id).to(torch.int32)
            grid = prompt.image_grid_thw.to(device)
            positions, delta = base.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid)
            out = base(input_ids=ids, position_ids=positions, mm_token_type_ids=types,
                       pixel_values=prompt.pixel_values.to(device, model.dtype), image_grid_thw=grid,
                       use_cache=True)
            caches.append(out.past_key_values)
            lengths.append(ids.shape[1])
            deltas.append(int(delta.reshape(-1)[0]))
            first_logits.append(lm_head(out.last_hidden_state[:, -1]).float())
        cache = _batched_cache(caches, lengths, G)
        del caches

        # 2. Decode all P*G sequences together.
        longest = max(lengths)
        real = torch.tensor(lengths, device=device).repeat_interleave(G)  # (B,) prompt lengths
        mask = (torch.arange(longest, device=device)[None] >= (longest - real)[:, None]).long()  # left pad
        next_pos = (real + torch.tensor(deltas, device=device).repeat_interleave(G))  # (B,) M-RoPE
        logits = torch.cat(first_logits).repeat_interleave(G, dim=0)  # (B, V)
        B = logits.shape[0]
        tokens = torch.empty(B, max_new_tokens, dtype=torch.int64, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        steps = 0
        for t in range(max_new_tokens):
            logits[:, banned] = float("-inf")
            token = _sample(logits, temperature, top_p, generator)
            tokens[:, t] = token
            steps = t + 1
            done |= torch.isin(token, eos)
            if t + 1 == max_new_tokens or bool(done.all()):  # a host sync per token: cheap next to a forward
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
            position = (next_pos + t).view(1, B, 1).expand(3, B, 1)
            out = base(input_ids=token[:, None], position_ids=position, attention_mask=mask,
                       past_key_values=cache, use_cache=True)
            logits = lm_head(out.last_hidden_state[:, -1]).float()

    tokens = tokens[:, :steps].cpu()
    is_eos = torch.isin(tokens, eos.cpu())
    stopped = is_eos.any(dim=1)
    # Length up to and including the first EOS; the whole row if it never stopped.
    lengths_out = torch.where(stopped, is_eos.int().argmax(dim=1) + 1, torch.full_like(stopped, steps, dtype=torch.int64))
    return Completions([row[:n] for row, n in zip(tokens, lengths_out.tolist())], stopped,
                       decode_slots=tokens.shape[0] * steps)
