"""The rollout's KV cache: each prompt's keys and values held once, each completion's own.

Allocated once per rollout and written in place; nothing grows per token.

    prefix_k, prefix_v: (L, NP, Hkv, Lp, D)  the prompts' keys/values (after RoPE), prompt p in
                        slot p, left-aligned, padded to the longest prompt Lp
    prefix_bias:        (NP, Lp) fp32        0 on a prompt's tokens, -inf on its padding
    comp_k, comp_v:     (L, B, Hkv, C, D)    the completions' keys/values; row i holds the live
                        sequence i (rows are compacted as sequences finish), column t the
                        t-th sampled token

The G completions of a prompt read its keys from one place: the memory held is
prompts + completions, not G x prompts + completions. Decoding attends over the two parts
separately and merges them by their log-sum-exp (`shared_prefix_attention`), which equals one
softmax over the concatenation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RolloutCache:
    prefix_k: torch.Tensor  # (L, NP, Hkv, Lp, D) model dtype
    prefix_v: torch.Tensor  # (L, NP, Hkv, Lp, D)
    prefix_bias: torch.Tensor  # (NP, Lp) fp32: 0 = a prompt token, -inf = padding
    comp_k: torch.Tensor  # (L, B, Hkv, C, D)
    comp_v: torch.Tensor  # (L, B, Hkv, C, D)

    @classmethod
    def allocate(cls, prompt_lengths: list[int], num_generations: int, max_new_tokens: int, num_layers: int,
                 num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 prefix_capacity: int | None = None) -> RolloutCache:
        """Empty cache for len(prompt_lengths) prompts x num_generations completions of up to
        max_new_tokens tokens (the last sampled token is never fed back, so C = max_new_tokens - 1
        columns would do; one more keeps C >= 1). prefix_capacity: Lp, default the longest
        prompt (more lets a later rollout with longer prompts reuse the cache)."""
        NP = len(prompt_lengths)
        Lp = prefix_capacity or max(prompt_lengths)
        B = NP * num_generations
        prefix = (num_layers, NP, num_kv_heads, Lp, head_dim)
        comp = (num_layers, B, num_kv_heads, max_new_tokens, head_dim)
        cache = cls(torch.zeros(prefix, dtype=dtype, device=device), torch.zeros(prefix, dtype=dtype, device=device),
                    torch.zeros(NP, Lp, device=device), torch.zeros(comp, dtype=dtype, device=device),
                    torch.zeros(comp, dtype=dtype, device=device))
        cache.set_prompt_lengths(prompt_lengths)
        return cache

    def set_prompt_lengths(self, prompt_lengths: list[int]) -> None:
        """Mask each prefix slot past its prompt's length (a new rollout in a reused cache)."""
        NP, Lp = self.prefix_bias.shape
        if len(prompt_lengths) != NP or max(prompt_lengths) > Lp:
            raise ValueError(f"RolloutCache: {len(prompt_lengths)} prompts of up to {max(prompt_lengths)} tokens "
                             f"do not fit {NP} slots of {Lp}")
        lengths = torch.tensor(prompt_lengths, device=self.prefix_bias.device)
        self.prefix_bias.zero_().masked_fill_(
            torch.arange(Lp, device=lengths.device)[None] >= lengths[:, None], float("-inf"))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.prefix_k, self.prefix_v, self.comp_k, self.comp_v))

    def move_rows(self, src: torch.Tensor, dst: torch.Tensor, columns: int) -> None:
        """Copy completion rows src to rows dst (int64, disjoint), in place; only the first
        `columns` columns hold anything yet. Compaction moves the live rows past the new batch
        size into the finished rows before it, so it copies only as many rows as finished."""
        for cache in (self.comp_k, self.comp_v):
            cache[:, dst, :, :columns] = cache[:, src, :, :columns]

    def compact_prompts(self, keep: torch.Tensor) -> None:
        """Move prompt slots `keep` (sorted ascending) to slots 0..len(keep)-1, in place."""
        n = keep.numel()
        for cache in (self.prefix_k, self.prefix_v):
            cache[:, :n] = cache[:, keep]
        self.prefix_bias[:n] = self.prefix_bias[keep]


def shared_prefix_attention(
    query: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_bias: torch.Tensor,
    slots: torch.Tensor,
    group: int,
    comp_k: torch.Tensor,
    comp_v: torch.Tensor,
    comp_bias: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """One query token per row attending to its prompt's keys, then to its own completion's.

    Args:
        query: (B, Hkv, R, D); R = query heads per key/value head (grouped-query attention).
        prefix_k, prefix_v: (NP, Hkv, Lp, D), one layer's prompt part.
        prefix_bias: (NP, Lp) fp32, 0 or -inf (padding).
        slots: (B,) int64, row b's place in an (NP, group) grid: prompt slots[b] // group. The
            prefix part runs on that grid, so each prompt's keys are read once for its rows
            (empty grid places compute values nobody reads). Distinct, except NP * group: a
            padding row (bucketed batches), whose output is garbage.
        group: places per prompt in the grid (G).
        comp_k, comp_v: (B, Hkv, C, D), each row's own keys (every column valid unless masked).
        comp_bias: None, or (C,) fp32 0 / -inf for columns not yet written (static shapes).
        scale: the softmax scale (scores = scale * q.k).

    Returns:
        (B, Hkv, R, D) in query's dtype. Softmax statistics in fp32 (fp64 for fp64 inputs).
    """
    B, Hkv, R, D = query.shape
    NP = prefix_k.shape[0]
    # Prefix part on the grid: (NP, Hkv, group*R, D) queries against (NP, Hkv, Lp, D) keys.
    # One place past the grid takes the padding rows' queries (several may land there).
    grid = query.new_zeros(NP * group + 1, Hkv, R, D).index_copy_(0, slots, query)[:-1]
    slots = slots.clamp(max=NP * group - 1)  # padding rows read any place: their output is unused
    grid = grid.view(NP, group, Hkv, R, D).transpose(1, 2).reshape(NP, Hkv, group * R, D)
    out_p, lse_p = _attend(grid, prefix_k, prefix_v, prefix_bias[:, None, None, :], scale)
    out_p = out_p.view(NP, Hkv, group, R, D).transpose(1, 2).reshape(NP * group, Hkv, R, D).index_select(0, slots)
    lse_p = lse_p.view(NP, Hkv, group, R).transpose(1, 2).reshape(NP * group, Hkv, R, 1).index_select(0, slots)
    # Own part: (B, Hkv, R, D) against (B, Hkv, C, D).
    out_c, lse_c = _attend(query, comp_k, comp_v, None if comp_bias is None else comp_bias.view(1, 1, 1, -1), scale)
    # Merge: softmax over the concatenation = the parts weighted by their share of the mass,
    # exp(lse_p) / (exp(lse_p) + exp(lse_c)) = sigmoid(lse_p - lse_c) for the prompt part.
    acc = lse_p.dtype
    share = torch.sigmoid(lse_p - lse_c[..., None])
    return torch.lerp(out_c.to(acc), out_p.to(acc), share).to(query.dtype)


def _attend(query, key, value, bias, scale):
    """softmax(query @ key^T + bias) @ value and its log-sum-exp (..., M) in fp32 (fp64 for
    fp64 inputs); query (N, H, M, D), key/value (N, H, L, D), bias broadcastable or None.
    On a CPU, eagerly: PyTorch's fused flash kernel, which returns the log-sum-exp (one op
    instead of six, no (M, L) scores written out). Otherwise plain ops, which inductor fuses."""
    if (query.device.type == "cpu" and query.dtype in (torch.float32, torch.bfloat16)
            and not torch.compiler.is_compiling()):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, False, attn_mask=None if bias is None else bias.to(query.dtype), scale=scale)[:2]
        return out, lse
    acc = torch.promote_types(query.dtype, torch.float32)
    scores = torch.matmul(query * scale, key.transpose(-1, -2)).to(acc)
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.matmul(torch.exp(scores - lse).to(value.dtype), value), lse[..., 0]
