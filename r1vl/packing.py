"""Padding-free batches for Qwen2-VL: several sequences packed into one row.

`pack` lays the sequences of a micro-batch end to end in a single row, with the positions
restarting for each sequence, so that varlen attention (r1vl.attention) never mixes two
sequences and no compute is spent on padding. `plan_microbatches` decides which sequences go
into which micro-batch on which data-parallel rank.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

# The model's own M-RoPE index function, e.g. `Qwen2VLModel.get_rope_index`:
# (input_ids (1, L), mm_token_type_ids (1, L), image_grid_thw (n, 3) | None) -> ((3, 1, L), deltas)
RopeIndexFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------------------------
# Inputs and the packed batch
# --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One sequence to pack: a prompt as the processor returned it, and a sampled completion.

    The prompt already holds the expanded image placeholders, one `image_token_id` per merged
    patch (t * h * w / merge**2 of them per image), each image one contiguous run.
    """

    prompt_ids: torch.Tensor | Sequence[int]  # (P,) int, P >= 1
    completion_ids: torch.Tensor | Sequence[int]  # (C,) int, C >= 1, no image tokens
    pixel_values: torch.Tensor | None = None  # (sum_i t_i*h_i*w_i, C*T*p*p) float, images in order
    image_grid_thw: torch.Tensor | None = None  # (n_images, 3) int, patches along t, h, w


@dataclass
class PackedBatch:
    """S sequences packed into one row of T tokens; N of them are completion targets.

    Example, S = 3: A = prompt with one image of 4 merged patches + completion of 2 tokens,
    B = text-only prompt + completion of 1 token, C = a GRPO sibling of A (same prompt and
    image) + completion of 3 tokens. p = prompt text, v/e = vision start/end, I = image
    token, c = completion token:

        token             p v I I I I e p c c | p p p c | p v I I I I e p c c c
        row index         0 1 2 3 4 5 6 7 8 9 |10 ...13 |14 ...             24
        mm_token_type_ids 0 0 1 1 1 1 0 0 0 0 | 0 0 0 0 | 0 0 1 1 1 1 0 0 0 0 0
        position_ids[0]   0 1 2 3 4 5 6 7 8 9 | 0 1 2 3 | 0 1 2 3 4 5 6 7 8 9 10
        position_ids[1:]  M-RoPE t/h/w of each sequence alone, from the model's rope index
        cu_seqlens        [0, 10, 14, 25]                      max_seqlen = 11
        completion_index  [7, 8 | 12 | 21, 22, 23]             (rows whose NEXT token is a
        target_ids        [c, c | c  | c,  c,  c ]              completion token: the last
        completion_cu_seqlens [0, 2, 3, 6]                      prompt token and all
                                                                completion tokens but the last)

    The image of A and C is encoded once: `pixel_values` / `image_grid_thw` hold the distinct
    images only (here one), and `image_token_source` maps each of the 8 image-token rows to a
    row of the vision tower's output ([0, 1, 2, 3, 0, 1, 2, 3]). Without repeated images they
    are the images in order and `image_token_source` is arange.
    """

    input_ids: torch.Tensor  # (1, T) int64
    position_ids: torch.Tensor  # (4, 1, T) int64; row 0 text positions, rows 1-3 M-RoPE t/h/w
    mm_token_type_ids: torch.Tensor  # (1, T) int32; 1 at image tokens, else 0
    cu_seqlens: torch.Tensor  # (S+1,) int32, starts at 0, ends at T
    max_seqlen: int  # longest sequence, a Python int so that no kernel needs a device sync
    pixel_values: torch.Tensor | None  # (P_u, C*T*p*p) float, patches of the distinct images
    image_grid_thw: torch.Tensor | None  # (U, 3) int64, grids of the distinct images
    image_token_source: torch.Tensor | None  # (n_image_tokens,) int64, rows of tower output
    completion_index: torch.Tensor  # (N,) int64, rows in [0, T) whose next token is a target
    target_ids: torch.Tensor  # (N,) int64, == input_ids[0, completion_index + 1]
    completion_cu_seqlens: torch.Tensor  # (S+1,) int32, sequence boundaries over the N rows

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """Copy of the batch with every tensor on `device` (the Python ints stay as they are)."""
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        moved = {
            name: t.to(device, non_blocking=non_blocking)
            for name, t in tensors.items()
            if isinstance(t, torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


# --------------------------------------------------------------------------------------------
# pack
# --------------------------------------------------------------------------------------------


def pack(samples: Sequence[Sample], model: torch.nn.Module) -> PackedBatch:
    """Pack `samples` into one padding-free row for `model` (a Qwen2-VL or Qwen2.5-VL model).

    The model gives the image token id, the vision merge size and its own rope-index function
    (`get_rope_index`), which is run on each sequence alone so that the M-RoPE positions
    restart per sequence exactly as in an unpacked forward. All tensors are built on the CPU;
    move the result with `.to(device)`.

    Raises ValueError naming the sample and the problem for: an empty prompt or completion,
    image tokens in a completion, image runs that do not match `image_grid_thw`, pixel rows
    that do not match the grids, images given without grids (or the other way round), and
    video tokens (videos are not supported).
    """
    if len(samples) == 0:
        raise ValueError("pack: samples is empty")
    config = model.config
    image_token_id = int(config.image_token_id)
    video_token_id = getattr(config, "video_token_id", None)
    merge = int(config.vision_config.spatial_merge_size)
    rope_index = _rope_index_fn(model)

    ids_parts, pos_parts, type_parts, seq_lens = [], [], [], []
    index_parts, target_parts, completion_lens = [], [], []
    images: list[tuple[torch.Tensor, torch.Tensor]] = []  # (pixel rows, grid (3,)) per image
    offset = 0
    for i, sample in enumerate(samples):
        prompt = _as_ids(sample.prompt_ids, i, "prompt_ids")
        completion = _as_ids(sample.completion_ids, i, "completion_ids")
        if prompt.numel() == 0:
            raise ValueError(f"pack: sample {i} has an empty prompt")
        if completion.numel() == 0:
            raise ValueError(f"pack: sample {i} has an empty completion (nothing to score)")
        if (completion == image_token_id).any():
            raise ValueError(
                f"pack: sample {i}: the completion contains the image token {image_token_id}; "
                "ban it when sampling, it has no image features to stand for"
            )
        if video_token_id is not None and (prompt == video_token_id).any():
            raise ValueError(f"pack: sample {i}: the prompt holds video tokens; videos are not supported")
        sample_images = _split_images(sample, prompt, i, image_token_id, merge)

        ids = torch.cat([prompt, completion])
        types = (ids == image_token_id).to(torch.int32)
        grid = torch.stack([g for _, g in sample_images]) if sample_images else None
        mrope, _ = rope_index(ids[None], mm_token_type_ids=types[None], image_grid_thw=grid)
        text = torch.arange(ids.numel(), dtype=torch.int64)
        pos_parts.append(torch.cat([text[None], mrope[:, 0].to(torch.int64)]))  # (4, L)

        # The row before each completion token predicts it: rows P-1 .. P+C-2 of the sequence.
        p, c = prompt.numel(), completion.numel()
        index_parts.append(torch.arange(offset + p - 1, offset + p + c - 1, dtype=torch.int64))
        target_parts.append(completion)
        ids_parts.append(ids)
        type_parts.append(types)
        images.extend(sample_images)
        seq_lens.append(ids.numel())
        completion_lens.append(c)
        offset += ids.numel()

    pixel_values, image_grid_thw, image_token_source = _dedupe_images(images, merge)
    return PackedBatch(
        input_ids=torch.cat(ids_parts)[None],
        position_ids=torch.cat(pos_parts, dim=1)[:, None],
        mm_token_type_ids=torch.cat(type_parts)[None],
        cu_seqlens=_cumulative(seq_lens),
        max_seqlen=max(seq_lens),
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        image_token_source=image_token_source,
        completion_index=torch.cat(index_parts),
        target_ids=torch.cat(target_parts),
        completion_cu_seqlens=_cumulative(completion_lens),
    )


def _rope_index_fn(model: torch.nn.Module) -> RopeIndexFn:
    # Qwen2VLForConditionalGeneration keeps get_rope_index on its inner Qwen2VLModel.
    for candidate in (model, getattr(model, "model", None)):
        if candidate is not None and hasattr(candidate, "get_rope_index"):
            return candidate.get_rope_index
    raise ValueError(f"pack: {type(model).__name__} has no get_rope_index (not a Qwen2-VL model?)")


def _as_ids(ids: torch.Tensor | Sequence[int], i: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(ids)
    if t.ndim != 1:
        raise ValueError(f"pack: sample {i}: {name} must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() > 0 and (t.dtype.is_floating_point or t.dtype == torch.bool):
        raise ValueError(f"pack: sample {i}: {name} must hold integers, got {t.dtype}")
    return t.to(torch.int64).cpu()


def _split_images(
    sample: Sample, prompt: torch.Tensor, i: int, image_token_id: int, merge: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Check the sample's images against its prompt; return (pixel rows, grid) per image."""
    runs = _image_token_runs(prompt, image_token_id)
    if sample.pixel_values is None and sample.image_grid_thw is None:
        if runs:
            raise ValueError(
                f"pack: sample {i} has {len(runs)} run(s) of image tokens but no pixel_values"
            )
        return []
    if sample.pixel_values is None or sample.image_grid_thw is None:
        raise ValueError(f"pack: sample {i}: pixel_values and image_grid_thw go together")
    grid = torch.as_tensor(sample.image_grid_thw).to(torch.int64).cpu()
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"pack: sample {i}: image_grid_thw must be (n, 3), got {tuple(grid.shape)}")
    if len(runs) != grid.shape[0]:
        raise ValueError(
            f"pack: sample {i}: {grid.shape[0]} image(s) in image_grid_thw but {len(runs)} "
            "separate run(s) of image tokens in the prompt"
        )
    patches = grid.prod(-1)
    for j, (run, n_patch, g) in enumerate(zip(runs, patches.tolist(), grid.tolist())):
        if n_patch % (merge * merge) != 0 or run != n_patch // (merge * merge):
            raise ValueError(
                f"pack: sample {i}, image {j}: grid {g} gives {n_patch // (merge * merge)} image "
                f"tokens (t*h*w/{merge}**2) but the prompt holds {run}"
            )
    pixels = sample.pixel_values
    if pixels.ndim != 2 or pixels.shape[0] != int(patches.sum()):
        raise ValueError(
            f"pack: sample {i}: pixel_values must be (sum t*h*w = {int(patches.sum())}, "
            f"C*T*p*p), got {tuple(pixels.shape)}"
        )
    return list(zip(torch.split(pixels, patches.tolist()), grid))


def _image_token_runs(ids: torch.Tensor, image_token_id: int) -> list[int]:
    """Lengths of the maximal runs of `image_token_id` in `ids`, in order."""
    is_image = torch.cat([torch.zeros(1, dtype=torch.int8), (ids == image_token_id).to(torch.int8)])
    edges = torch.diff(is_image, append=torch.zeros(1, dtype=torch.int8))
    starts, ends = torch.nonzero(edges == 1).flatten(), torch.nonzero(edges == -1).flatten()
    return (ends - starts).tolist()


def _dedupe_images(
    images: list[tuple[torch.Tensor, torch.Tensor]], merge: int
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Keep each distinct image once; map every image token to its row of tower output.

    GRPO packs G completions of one prompt, so the same image appears G times; encoding it
    once saves (G-1)/G of the vision tower. Images are the same when their grids and pixels
    are equal (the tower sees nothing else, and it attends within one image only).
    """
    if not images:
        return None, None, None
    distinct: list[int] = []  # index into `images` of each distinct image
    first_row: list[int] = []  # its first row of tower output
    by_key: dict[tuple, list[int]] = {}  # cheap fingerprint -> distinct images that have it
    token_source = []
    rows = 0
    for k, (pixels, grid) in enumerate(images):
        key = (tuple(grid.tolist()), tuple(pixels.shape), pixels.dtype)
        candidates = by_key.setdefault(key, [])
        d = next((d for d in candidates if _same_pixels(images[distinct[d]][0], pixels)), None)
        n_tokens = int(grid.prod()) // (merge * merge)
        if d is None:
            d = len(distinct)
            candidates.append(d)
            distinct.append(k)
            first_row.append(rows)
            rows += n_tokens
        token_source.append(torch.arange(n_tokens, dtype=torch.int64) + first_row[d])
    pixel_values = torch.cat([images[k][0] for k in distinct])
    image_grid_thw = torch.stack([images[k][1] for k in distinct])
    return pixel_values, image_grid_thw, torch.cat(token_source)


def _same_pixels(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Siblings of one prompt usually share the very tensor, which needs no comparison.
    same_view = a.data_ptr() == b.data_ptr() and a.stride() == b.stride()
    return same_view or torch.equal(a, b)


def _cumulative(lengths: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu


# --------------------------------------------------------------------------------------------
# plan_microbatches
# --------------------------------------------------------------------------------------------


def plan_microbatches(
    lengths: Sequence[int],
    max_tokens: int,
    world_size: int,
    groups: Sequence[Hashable] | None = None,
) -> list[list[list[int]]]:
    """Split sequences into token-budgeted micro-batches, balanced over data-parallel ranks.

    Args:
        lengths: token count of each sequence (prompt + image tokens + completion), all >= 1.
        max_tokens: budget of one micro-batch (the packed row length T may not exceed it).
        world_size: number of data-parallel ranks.
        groups: optional key per sequence, e.g. the prompt index of each GRPO completion.
            Sequences of one group are kept in one micro-batch where the budget allows, so
            that `pack` encodes their shared image once instead of G times. The price is a
            coarser balance (see below).

    Returns:
        plan[rank][step] = indices into `lengths` of the sequences packed together, in
        increasing order. Every rank gets the same number of micro-batch steps (gradient
        accumulation and ZeRO collectives run in lockstep); every sequence is placed exactly
        once; each micro-batch holds at most `max_tokens` tokens. A micro-batch is empty only
        when its rank has fewer sequences than there are steps; the loop must still step it.

    Guarantees: the ranks' token totals differ by at most the largest unit placed, a unit
    being one sequence (no groups) or one group (or, for a group over the budget, a
    budget-sized part of it): greedy longest-first assignment to the least-loaded rank.
    Deterministic: ties break by index and rank, so every rank computes the same plan.

    Raises ValueError when a sequence is longer than `max_tokens` (never cut silently).
    """
    if max_tokens < 1:
        raise ValueError(f"plan_microbatches: max_tokens must be >= 1, got {max_tokens}")
    if world_size < 1:
        raise ValueError(f"plan_microbatches: world_size must be >= 1, got {world_size}")
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
    size = lambda unit: sum(lengths[i] for i in unit)  # noqa: E731
    units = sorted(_units(lengths, max_tokens, groups), key=lambda u: (-size(u), u[0]))

    # 1. Ranks: each unit, largest first, to the least-loaded rank.
    per_rank: list[list[list[int]]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for unit in units:
        r = min(range(world_size), key=lambda r: (load[r], r))
        per_rank[r].append(unit)
        load[r] += size(unit)

    # 2. Micro-batches within each rank: first-fit decreasing under the budget. A micro-batch
    # is a list of units here, flattened at the end.
    bins_per_rank = [_first_fit(rank_units, size, max_tokens) for rank_units in per_rank]

    # 3. Same step count on every rank: split the fullest micro-batch that can be split,
    # between its units if it has several, else between the sequences of its one unit.
    steps = max(len(bins) for bins in bins_per_rank)
    for bins in bins_per_rank:
        while len(bins) < steps:
            splittable = [j for j, b in enumerate(bins) if len(b) > 1 or len(b[0]) > 1]
            if not splittable:
                break
            j = max(splittable, key=lambda j: (sum(map(size, bins[j])), -j))
            parts = bins[j] if len(bins[j]) > 1 else [[i] for i in bins[j][0]]
            bins[j : j + 1] = _halve(parts, size)
        bins.extend([] for _ in range(steps - len(bins)))
    plan = [[sorted(i for unit in b for i in unit) for b in bins] for bins in bins_per_rank]
    # Largest first on every rank, so that the ranks' step k are alike in size: in lockstep
    # a step takes as long as its largest micro-batch on any rank.
    for rank in plan:
        rank.sort(key=lambda b: (-size(b), b[:1]))
    return plan


def _units(lengths: Sequence[int], max_tokens: int, groups: Sequence[Hashable] | None) -> list[list[int]]:
    """What the planner places whole: single sequences, or groups (in budget-sized parts)."""
    if groups is None:
        return [[i] for i in range(len(lengths))]
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    units = []
    for seqs in members.values():
        longest_first = sorted(seqs, key=lambda i: (-lengths[i], i))
        units += _first_fit([[i] for i in longest_first], lambda u: lengths[u[0]], max_tokens)
    return [[i for unit in part for i in unit] for part in units]


def _first_fit(units: list[list[int]], size, max_tokens: int) -> list[list[list[int]]]:
    """First-fit decreasing; `units` are already largest first."""
    bins: list[list[list[int]]] = []
    room: list[int] = []
    for unit in units:
        n = size(unit)
        j = next((j for j, free in enumerate(room) if free >= n), None)
        if j is None:
            bins.append([])
            room.append(max_tokens)
            j = len(bins) - 1
        bins[j].append(unit)
        room[j] -= n
    return bins


def _halve(units: list[list[int]], size) -> list[list[list[int]]]:
    """Split >= 2 units into two non-empty micro-batches of similar size."""
    halves: list[list[list[int]]] = [[], []]
    load = [0, 0]
    for unit in sorted(units, key=lambda u: (-size(u), u[0])):
        h = 0 if load[0] <= load[1] else 1
        halves[h].append(unit)
        load[h] += size(unit)
    return halves
