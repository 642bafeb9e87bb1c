"""The update's own batch: one rank's sequences planned into token-budgeted micro-batches
and packed (r1vl.update.packing), each with its advantages.

    batch = plan_batch(sequences, advantages, group_size, model, cfg.memory, device)
    for mb in batch.microbatches: ...                     # mb.indices, mb.packed, mb.advantages

Two plans: with shared prompts (`plan_shared_microbatches`) a prompt group costs its prompt
once plus its completions, and a group over the budget is split into parts that each
recompute the prompt; without (`plan_microbatches`) every sequence carries its own prompt
and a group's sequences stay together where they fit, so that their image is encoded once.
"""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

from r1vl.config import MemoryOptions
from r1vl.update.packing import PackedBatch, Sequence, pack, prompt_groups


@dataclass
class SharedPlan:
    """Micro-batches for `pack(..., share_prompts=True)`, and how many groups were split."""

    microbatches: list[list[int]]  # sequence indices of each micro-batch, increasing, largest first
    split_groups: int  # prompt groups that did not fit one micro-batch whole (prompt recomputed)
    tokens: int  # rows all micro-batches compute together (prompts once per part + completions)


def plan_shared_microbatches(sequences: list[Sequence], max_tokens: int) -> SharedPlan:
    """One rank's micro-batches of shared-prompt groups, each at most `max_tokens` rows.

    The sequences with equal prompts and images form a group that costs P + sum of its C rows
    when packed with share_prompts=True. A group that fits the budget is placed whole; one
    that does not is split into parts [prompt, some completions] that each fit (first-fit
    decreasing over its completions), every part recomputing the prompt, and counted in
    `split_groups`. The parts and groups then go into micro-batches first-fit decreasing;
    two parts of one split group never share a micro-batch (together they do not fit).

    Raises ValueError when one prompt with one completion is longer than `max_tokens`.
    """
    if max_tokens < 1:
        raise ValueError(f"plan_shared_microbatches: max_tokens must be >= 1, got {max_tokens}")
    if len(sequences) == 0:
        return SharedPlan([], 0, 0)
    groups = prompt_groups(sequences)  # checks every sequence's ids
    lengths = [(len(s.prompt_ids), len(s.completion_ids)) for s in sequences]
    for i, (p, c) in enumerate(lengths):
        if p + c > max_tokens:
            raise ValueError(
                f"plan_shared_microbatches: sequence {i} has {p + c} tokens, more than "
                f"the micro-batch budget max_tokens={max_tokens}; raise the budget or shorten the sequence"
            )
    units, split = [], 0
    for members in groups:
        p = lengths[members[0]][0]
        clen = {i: lengths[i][1] for i in members}
        if p + sum(clen.values()) <= max_tokens:
            units.append((p + sum(clen.values()), members))
            continue
        split += 1
        longest_first = sorted(members, key=lambda i: (-clen[i], i))
        parts, _ = _first_fit_sized([(clen[i], [i]) for i in longest_first], max_tokens - p)
        units += [(p + sum(clen[i] for i in part), part) for part in parts]
    units.sort(key=lambda u: (-u[0], min(u[1])))
    bins, room = _first_fit_sized(units, max_tokens)
    order = sorted(range(len(bins)), key=lambda j: (room[j], min(bins[j])))  # fullest first
    return SharedPlan([sorted(bins[j]) for j in order], split, sum(max_tokens - r for r in room))


def _first_fit_sized(units: list[tuple[int, list[int]]], capacity: int) -> tuple[list[list[int]], list[int]]:
    """First fit, in the given order, of (size, members) units into bins of `capacity`;
    returns each bin's members and its room left."""
    bins: list[list[int]] = []
    room: list[int] = []
    for size, members in units:
        j = next((j for j, free in enumerate(room) if free >= size), None)
        if j is None:
            bins.append([])
            room.append(capacity)
            j = len(bins) - 1
        bins[j] += members
        room[j] -= size
    return bins, room


def plan_microbatches(
    lengths: list[int],
    max_tokens: int,
    groups: list[Hashable] | None = None,
) -> list[list[int]]:
    """One rank's sequences cut into token-budgeted micro-batches, for `pack(..., share_prompts=False)`.

    Other ranks plan their own sequences the same way; that every rank then runs as many
    micro-batches is the engine's job (engine.lockstep pads the shorter lists with idle batches).

    Args:
        lengths: token count of each sequence (prompt + image tokens + completion), all >= 1.
        max_tokens: budget of one micro-batch (the packed row length T may not exceed it).
        groups: optional key per sequence, e.g. the prompt index of each GRPO completion.
            Sequences of one group are kept in one micro-batch where the budget allows, so
            that `pack` encodes their shared image once instead of G times; a group over the
            budget is cut into budget-sized parts (first-fit decreasing over its sequences).

    Returns:
        plan[k] = indices into `lengths` of the sequences packed together in micro-batch k, in
        increasing order, every micro-batch non-empty and at most `max_tokens` tokens, every
        sequence placed exactly once, the fullest micro-batches first. First-fit decreasing
        over the units (single sequences, or groups and their parts); deterministic (ties
        break by index).

    Raises ValueError when a sequence is longer than `max_tokens` (never cut silently).
    """
    if max_tokens < 1:
        raise ValueError(f"plan_microbatches: max_tokens must be >= 1, got {max_tokens}")
    if groups is not None and len(groups) != len(lengths):
        raise ValueError(f"plan_microbatches: {len(groups)} groups for {len(lengths)} lengths")
    for i, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"plan_microbatches: sequence {i} has length {n}; lengths must be >= 1")
        if n > max_tokens:
            raise ValueError(
                f"plan_microbatches: sequence {i} has {n} tokens, more than the micro-batch "
                f"budget max_tokens={max_tokens}; raise the budget or shorten the sequence"
            )
    units = []  # (tokens, sequence indices) of what is placed whole
    for members in ([[i] for i in range(len(lengths))] if groups is None else _members(groups)):
        longest_first = sorted(members, key=lambda i: (-lengths[i], i))
        parts, _ = _first_fit_sized([(lengths[i], [i]) for i in longest_first], max_tokens)
        units += [(sum(lengths[i] for i in part), part) for part in parts]
    units.sort(key=lambda u: (-u[0], u[1][0]))  # a part's first member is its longest
    bins, _ = _first_fit_sized(units, max_tokens)
    plan = [sorted(b) for b in bins]
    plan.sort(key=lambda b: (-sum(lengths[i] for i in b), b[0]))
    return plan


def _members(groups: list[Hashable]) -> list[list[int]]:
    """Indices of each group's sequences, groups in order of first appearance."""
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    return list(members.values())


# --------------------------------------------------------------------------------------------
# The batch the update runs
# --------------------------------------------------------------------------------------------


@dataclass
class MicroBatch:
    """Some of a rank's sequences, packed into one row, with their advantages."""

    indices: list[int]  # into the rank's sequences, increasing
    packed: PackedBatch  # on the device
    advantages: torch.Tensor  # (S,) fp32, one per packed sequence, in `indices` order


@dataclass
class Batch:
    """One rank's share of a step, as the update runs it."""

    sequences: list[Sequence]  # the rank's (prompt, completion) pairs, prompt-major (p*G + g)
    microbatches: list[MicroBatch]
    split_groups: int  # prompt groups over micro_batch_tokens, packed in parts that each recompute the prompt

    @property
    def completion_tokens(self) -> int:
        """Completion tokens of this rank: the loss's target count."""
        return sum(len(s.completion_ids) for s in self.sequences)


def plan_batch(sequences: list[Sequence], advantages: torch.Tensor | None, group_size: int, model: torch.nn.Module,
               memory: MemoryOptions, device: torch.device) -> Batch:
    """The rank's sequences as packed micro-batches of at most memory.micro_batch_tokens rows.

    sequences: prompt-major, group_size consecutive sequences per prompt (1: no groups, the SFT
    warm-up); advantages: (len(sequences),) fp32, or None (SFT: all zero); memory: share_prompts,
    micro_batch_tokens.
    """
    if advantages is None:
        advantages = torch.zeros(len(sequences))
    if advantages.shape != (len(sequences),):
        raise ValueError(f"plan_batch: advantages must have shape ({len(sequences)},), one per sequence, "
                         f"got {tuple(advantages.shape)}")
    if group_size < 1 or len(sequences) % group_size:
        raise ValueError(f"plan_batch: {len(sequences)} sequences are not groups of group_size={group_size}")
    if memory.share_prompts:
        shared = plan_shared_microbatches(sequences, memory.micro_batch_tokens)
        plan, split = shared.microbatches, shared.split_groups
    else:
        lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in sequences]
        plan = plan_microbatches(lengths, memory.micro_batch_tokens, groups=[i // group_size for i in range(len(sequences))])
        split = 0
    micro = [MicroBatch(idx, pack([sequences[i] for i in idx], model, share_prompts=memory.share_prompts).to(device),
                        advantages[idx]) for idx in plan]
    return Batch(sequences, micro, split)
