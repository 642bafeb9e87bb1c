"""Padding-free batches for Qwen2-VL: several sequences packed into one row.

`pack` lays the sequences of a micro-batch end to end in a single row, with the positions
restarting for each sequence, so that varlen attention (r1vl.model.attention) never mixes two
sequences and no compute is spent on padding. With share_prompts=True the G completions of a
prompt share one copy of it: [prompt, c1, ..., cG], each completion attending to the prompt
and to itself only, so the prompt and its image tokens run through the model once per group.
Which sequences go into one micro-batch is r1vl.update.microbatches' choice.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

# The model's own M-RoPE index function, e.g. `Qwen2VLModel.get_rope_index`:
# (input_ids (1, L), mm_token_type_ids (1, L), image_grid_thw (n, 3) | None) -> ((3, 1, L), deltas)
RopeIndexFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------------------------
# Inputs and the packed batch
# --------------------------------------------------------------------------------------------


@dataclass
class Sequence:
    """One sequence to pack: a prompt as the processor returned it, and a sampled completion.

    The prompt already holds the expanded image placeholders, one `image_token_id` per merged
    patch (t * h * w / merge**2 of them per image), each image one contiguous run.
    """

    prompt_ids: torch.Tensor | list[int]  # (P,) int, P >= 1
    completion_ids: torch.Tensor | list[int]  # (C,) int, C >= 1, no image tokens
    pixel_values: torch.Tensor | None = None  # (sum_i t_i*h_i*w_i, C*T*p*p) float, images in order
    image_grid_thw: torch.Tensor | None = None  # (n_images, 3) int, patches along t, h, w


@dataclass
class PackedBatch:
    """S sequences packed into one row of T tokens; N of them are completion targets.

    Two layouts, both read by r1vl.update.forward.completion_hidden:

    Unshared (share_prompts=False): each sequence is [prompt, completion], one
    attention segment, causal within itself. Example, S = 3: A = prompt with one image of 4
    merged patches + completion of 2 tokens, B = text-only prompt + completion of 1 token,
    C = a GRPO sibling of A (same prompt and image) + completion of 3 tokens. p = prompt
    text, v/e = vision start/end, I = image token, c = completion token:

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
        key_index, cu_seqlens_k  None (every segment attends to itself only)

    Shared (share_prompts=True): the completions of one prompt (same ids, same images) form a
    group [prompt, c1, ..., cG], the prompt computed once. A completion attends to the whole
    prompt and causally to itself, never to a sibling; its positions continue from the
    prompt's end exactly as in its unshared sequence. The same S = 3 (A and C are one group):

        token             p v I I I I e p c c c c c | p p p c
        row index         0 1 2 3 4 5 6 7 8 9 ...12 |13 ...16
        segments          [prompt 0-7] [A 8-9] [C 10-12] | [B 13-16]
        position_ids[0]   0 1 2 3 4 5 6 7 8 9 8 9 10 | 0 1 2 3
        cu_seqlens        [0, 8, 10, 13, 17]                   (attention segments, K = 4)
        key_index         [0..7 | 0..7, 8, 9 | 0..7, 10, 11, 12 | 13..16]
        cu_seqlens_k      [0, 8, 18, 29, 33]                   max_seqlen_k = 11
        completion_index  [7, 8 | 16 | 7, 10, 11]              (sequence order; row 7 serves
        completion_cu_seqlens [0, 2, 3, 6]                      both A and C)

    Segment k's queries are rows cu_seqlens[k]:cu_seqlens[k+1]; its keys are rows
    key_index[cu_seqlens_k[k]:cu_seqlens_k[k+1]], a prefix it sees whole followed by its own
    rows, which it sees causally (the causal mask aligned to the bottom right, as flash-attn
    does for unequal query and key lengths).

    Images are encoded once: `pixel_values` / `image_grid_thw` hold the distinct images
    only, and `image_token_source` maps each image-token row to a row of the vision tower's
    output (unshared example: [0, 1, 2, 3, 0, 1, 2, 3]).
    """

    input_ids: torch.Tensor  # (1, T) int64
    position_ids: torch.Tensor  # (4, 1, T) int64; row 0 text positions, rows 1-3 M-RoPE t/h/w
    mm_token_type_ids: torch.Tensor  # (1, T) int32; 1 at image tokens, else 0
    cu_seqlens: torch.Tensor  # (K+1,) int32, attention segments' query rows, 0 .. T
    max_seqlen: int  # longest segment, a Python int so that no kernel needs a device sync
    pixel_values: torch.Tensor | None  # (P_u, C*T*p*p) float, patches of the distinct images
    image_grid_thw: torch.Tensor | None  # (U, 3) int64, grids of the distinct images
    image_token_source: torch.Tensor | None  # (n_image_tokens,) int64, rows of tower output
    completion_index: torch.Tensor  # (N,) int64, rows in [0, T) whose next token is a target
    target_ids: torch.Tensor  # (N,) int64, the completion tokens, sequence by sequence
    completion_cu_seqlens: torch.Tensor  # (S+1,) int32, sequence boundaries over the N rows
    key_index: torch.Tensor | None = None  # (T_k,) int64, each segment's key rows; None: its own
    cu_seqlens_k: torch.Tensor | None = None  # (K+1,) int32 over key_index; None: = cu_seqlens
    max_seqlen_k: int = 0  # longest key range (== max_seqlen when key_index is None)

    @property
    def num_sequences(self) -> int:
        """S, the packed completions (one advantage each)."""
        return self.completion_cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        """T, the rows the model computes."""
        return self.input_ids.shape[1]

    @property
    def shares_prompts(self) -> bool:
        return self.key_index is not None

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


@dataclass
class _Checked:
    """One sequence after the checks of `pack`: CPU int64 ids and its images."""

    prompt: torch.Tensor
    completion: torch.Tensor
    images: list[tuple[torch.Tensor, torch.Tensor]]  # (pixel rows, grid (3,)) per image


def pack(sequences: list[Sequence], model: torch.nn.Module, share_prompts: bool = False) -> PackedBatch:
    """Pack `sequences` into one padding-free row for `model` (a Qwen2-VL or Qwen2.5-VL model).

    The model gives the image token id, the vision merge size and its own rope-index function
    (`get_rope_index`), which is run on each prompt (with a completion) alone so that the
    M-RoPE positions are exactly those of an unpacked forward. All tensors are built on the
    CPU; move the result with `.to(device)`.

    share_prompts: lay the completions of one prompt out as one group [prompt, c1, ..., cG]
    (see PackedBatch); sequences belong to a group when their prompt ids and images are equal.
    The loss-side fields (completion_index, target_ids, completion_cu_seqlens) keep the
    sequences' order either way, so losses and advantages need no change.

    Raises ValueError naming the sequence and the problem for: an empty prompt or completion,
    image tokens in a completion, image runs that do not match `image_grid_thw`, pixel rows
    that do not match the grids, images given without grids (or the other way round), and
    video tokens (videos are not supported).
    """
    if len(sequences) == 0:
        raise ValueError("pack: sequences is empty")
    config = model.config
    image_token_id = int(config.image_token_id)
    merge = int(config.vision_config.spatial_merge_size)
    rope_index = _rope_index_fn(model)
    checked = [_check_sequence(s, i, image_token_id, getattr(config, "video_token_id", None), merge)
               for i, s in enumerate(sequences)]
    groups = _prompt_groups(checked) if share_prompts else [[i] for i in range(len(checked))]

    ids_parts, pos_parts, seg_lens = [], [], []
    key_parts, key_lens = [], []
    completion_rows: dict[int, torch.Tensor] = {}
    images: list[tuple[torch.Tensor, torch.Tensor]] = []
    offset = 0
    for members in groups:
        prompt, group_images = checked[members[0]].prompt, checked[members[0]].images
        completions = [checked[i].completion for i in members]
        grid = torch.stack([g for _, g in group_images]) if group_images else None
        # Positions of [prompt, longest completion]: a shorter completion's are a prefix of
        # them (the rope index runs left to right, and completions are all text).
        longest = max(completions, key=len)
        ids = torch.cat([prompt, longest])
        types = (ids == image_token_id).to(torch.int32)
        mrope, _ = rope_index(ids[None], mm_token_type_ids=types[None], image_grid_thw=grid)
        positions = torch.cat([torch.arange(ids.numel(), dtype=torch.int64)[None], mrope[:, 0].to(torch.int64)])
        p = prompt.numel()
        images.extend(group_images)
        if len(members) == 1:  # one sequence, one segment: the unshared layout
            c = completions[0].numel()
            ids_parts += [prompt, completions[0]]
            pos_parts.append(positions[:, : p + c])
            seg_lens.append(p + c)
            key_parts.append(torch.arange(offset, offset + p + c))
            key_lens.append(p + c)
            # The row before each completion token predicts it: rows P-1 .. P+C-2.
            completion_rows[members[0]] = torch.arange(offset + p - 1, offset + p + c - 1)
            offset += p + c
            continue
        prompt_rows = torch.arange(offset, offset + p)
        ids_parts.append(prompt)
        pos_parts.append(positions[:, :p])
        seg_lens.append(p)
        key_parts.append(prompt_rows)
        key_lens.append(p)
        offset += p
        for i, completion in zip(members, completions):
            c = completion.numel()
            own = torch.arange(offset, offset + c)
            ids_parts.append(completion)
            pos_parts.append(positions[:, p : p + c])
            seg_lens.append(c)
            key_parts += [prompt_rows, own]
            key_lens.append(p + c)
            # The prompt's last row predicts every sibling's first token.
            completion_rows[i] = torch.cat([prompt_rows[-1:], own[:-1]])
            offset += c

    order = range(len(checked))
    shared = any(len(members) > 1 for members in groups)
    completion_lens = [checked[i].completion.numel() for i in order]
    pixel_values, image_grid_thw, image_token_source = _dedupe_images(images, merge)
    input_ids = torch.cat(ids_parts)
    return PackedBatch(
        input_ids=input_ids[None],
        position_ids=torch.cat(pos_parts, dim=1)[:, None],
        mm_token_type_ids=(input_ids == image_token_id).to(torch.int32)[None],
        cu_seqlens=_cumulative(seg_lens),
        max_seqlen=max(seg_lens),
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        image_token_source=image_token_source,
        completion_index=torch.cat([completion_rows[i] for i in order]).to(torch.int64),
        target_ids=torch.cat([checked[i].completion for i in order]),
        completion_cu_seqlens=_cumulative(completion_lens),
        key_index=torch.cat(key_parts).to(torch.int64) if shared else None,
        cu_seqlens_k=_cumulative(key_lens) if shared else None,
        max_seqlen_k=max(key_lens),
    )


def _check_sequence(sequence: Sequence, i: int, image_token_id: int, video_token_id: int | None,
                  merge: int) -> _Checked:
    prompt = _as_ids(sequence.prompt_ids, i, "prompt_ids")
    completion = _as_ids(sequence.completion_ids, i, "completion_ids")
    if prompt.numel() == 0:
        raise ValueError(f"pack: sequence {i} has an empty prompt")
    if completion.numel() == 0:
        raise ValueError(f"pack: sequence {i} has an empty completion (nothing to score)")
    if (completion == image_token_id).any():
        raise ValueError(
            f"pack: sequence {i}: the completion contains the image token {image_token_id}; "
            "ban it when sampling, it has no image features to stand for"
        )
    if video_token_id is not None and (prompt == video_token_id).any():
        raise ValueError(f"pack: sequence {i}: the prompt holds video tokens; videos are not supported")
    return _Checked(prompt, completion, _split_images(sequence, prompt, i, image_token_id, merge))


def prompt_groups(sequences: list[Sequence]) -> list[list[int]]:
    """Indices of the sequences that share a prompt (equal prompt ids and equal images), as
    `pack(..., share_prompts=True)` groups them: groups in order of first appearance, each
    group's members in sequence order. Checks the ids' shape and type, not the image tokens
    (pack does)."""
    checked = []
    for i, s in enumerate(sequences):
        images = [] if s.pixel_values is None else [(s.pixel_values, torch.as_tensor(s.image_grid_thw).reshape(-1))]
        checked.append(_Checked(_as_ids(s.prompt_ids, i, "prompt_ids"), _as_ids(s.completion_ids, i, "completion_ids"),
                                images))
    return _prompt_groups(checked)


def _prompt_groups(checked: list[_Checked]) -> list[list[int]]:
    """Indices of the sequences with equal prompt ids and equal images, groups in order of
    first appearance (each group's members in sequence order)."""
    groups: list[list[int]] = []
    by_key: dict[tuple, list[int]] = {}  # cheap fingerprint -> groups that have it
    for i, s in enumerate(checked):
        key = (tuple(s.prompt.tolist()), tuple((tuple(g.tolist()), tuple(px.shape)) for px, g in s.images))
        candidates = by_key.setdefault(key, [])
        g = next((g for g in candidates if all(
            _same_pixels(a, b) for (a, _), (b, _) in zip(checked[groups[g][0]].images, s.images))), None)
        if g is None:
            candidates.append(len(groups))
            groups.append([i])
        else:
            groups[g].append(i)
    return groups


def _rope_index_fn(model: torch.nn.Module) -> RopeIndexFn:
    # Qwen2VLForConditionalGeneration keeps get_rope_index on its inner Qwen2VLModel.
    for candidate in (model, getattr(model, "model", None)):
        if candidate is not None and hasattr(candidate, "get_rope_index"):
            return candidate.get_rope_index
    raise ValueError(f"pack: {type(model).__name__} has no get_rope_index (not a Qwen2-VL model?)")


def _as_ids(ids: torch.Tensor | list[int], i: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(ids)
    if t.ndim != 1:
        raise ValueError(f"pack: sequence {i}: {name} must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() > 0 and (t.dtype.is_floating_point or t.dtype == torch.bool):
        raise ValueError(f"pack: sequence {i}: {name} must hold integers, got {t.dtype}")
    return t.to(torch.int64).cpu()


def _split_images(
    sequence: Sequence, prompt: torch.Tensor, i: int, image_token_id: int, merge: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Check the sequence's images against its prompt; return (pixel rows, grid) per image."""
    runs = _image_token_runs(prompt, image_token_id)
    if sequence.pixel_values is None and sequence.image_grid_thw is None:
        if runs:
            raise ValueError(
                f"pack: sequence {i} has {len(runs)} run(s) of image tokens but no pixel_values"
            )
        return []
    if sequence.pixel_values is None or sequence.image_grid_thw is None:
        raise ValueError(f"pack: sequence {i}: pixel_values and image_grid_thw go together")
    grid = torch.as_tensor(sequence.image_grid_thw).to(torch.int64).cpu()
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"pack: sequence {i}: image_grid_thw must be (n, 3), got {tuple(grid.shape)}")
    if len(runs) != grid.shape[0]:
        raise ValueError(
            f"pack: sequence {i}: {grid.shape[0]} image(s) in image_grid_thw but {len(runs)} "
            "separate run(s) of image tokens in the prompt"
        )
    patches = grid.prod(-1)
    for j, (run, n_patch, g) in enumerate(zip(runs, patches.tolist(), grid.tolist())):
        if n_patch % (merge * merge) != 0 or run != n_patch // (merge * merge):
            raise ValueError(
                f"pack: sequence {i}, image {j}: grid {g} gives {n_patch // (merge * merge)} image "
                f"tokens (t*h*w/{merge}**2) but the prompt holds {run}"
            )
    pixels = sequence.pixel_values
    if pixels.ndim != 2 or pixels.shape[0] != int(patches.sum()):
        raise ValueError(
            f"pack: sequence {i}: pixel_values must be (sum t*h*w = {int(patches.sum())}, "
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
