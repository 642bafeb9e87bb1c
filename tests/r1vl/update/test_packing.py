"""pack: the layout of a packed row, checked by hand; its input checks. plan_microbatches and
plan_shared_microbatches: one rank's micro-batches, their invariants over many random length
lists. That all ranks then run as many micro-batches is engine.lockstep's job
(tests/r1vl/update/test_deepspeed_engine.py)."""
import math
import random

import pytest
import torch
from tiny_qwen_vl import IMAGE, PIXEL_ROW, VIDEO, VISION_END, VISION_START, make_group, make_sequence, tiny_model

from r1vl.update.microbatches import SharedPlan, plan_microbatches, plan_shared_microbatches
from r1vl.update.packing import PackedBatch, Sequence, pack


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2_vl")


# --------------------------------------------------------------------------------------------
# pack: layout
# --------------------------------------------------------------------------------------------


def _three_samples():
    """A: one 4x6-patch image (2x3 merged tokens), completion of 2; B: text only, completion
    of 1; C: GRPO sibling of A (same prompt, same pixel tensor), completion of 3.
    Returns (A's pixels, A's prompt ids, (A, B, C))."""
    pixels = torch.randn(24, PIXEL_ROW)
    prompt_a = [5, VISION_START] + [IMAGE] * 6 + [VISION_END, 6]  # P = 10
    a = Sequence(prompt_a, [7, 8], pixels, torch.tensor([[1, 4, 6]]))
    b = Sequence([9, 10, 11], [12])
    c = Sequence(prompt_a, [13, 14, 15], pixels, torch.tensor([[1, 4, 6]]))
    return pixels, prompt_a, (a, b, c)


def test_layout_by_hand(model):
    pixels, prompt_a, (a, b, c) = _three_samples()
    packed = pack([a, b, c], model)

    assert packed.input_ids.tolist() == [prompt_a + [7, 8] + [9, 10, 11, 12] + prompt_a + [13, 14, 15]]
    assert packed.cu_seqlens.tolist() == [0, 12, 16, 29] and packed.cu_seqlens.dtype == torch.int32
    assert packed.max_seqlen == 13 and packed.num_sequences == 3 and packed.num_tokens == 29
    image_types = [0, 0] + [1] * 6 + [0, 0]
    assert packed.mm_token_type_ids.tolist() == [image_types + [0] * 2 + [0] * 4 + image_types + [0] * 3]

    # M-RoPE by hand: text advances all three rows together; the 2x3 image starts at the
    # current position p = 2, t stays p, h = p + row, w = p + column; text after it resumes
    # at p + max(2, 3) = 5.
    t_a = [0, 1, 2, 2, 2, 2, 2, 2, 5, 6, 7, 8]
    h_a = [0, 1, 2, 2, 2, 3, 3, 3, 5, 6, 7, 8]
    w_a = [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7, 8]
    text_b = [0, 1, 2, 3]
    pos = packed.position_ids
    assert pos.shape == (4, 1, 29) and pos.dtype == torch.int64
    assert pos[0, 0].tolist() == list(range(12)) + text_b + list(range(13))
    assert pos[1, 0].tolist() == t_a + text_b + t_a + [9]
    assert pos[2, 0].tolist() == h_a + text_b + h_a + [9]
    assert pos[3, 0].tolist() == w_a + text_b + w_a + [9]

    # Rows whose next token is a completion token: the last prompt row, then each completion
    # row but the last.
    assert packed.completion_index.tolist() == [9, 10, 14, 25, 26, 27]
    assert packed.target_ids.tolist() == [7, 8, 12, 13, 14, 15]
    assert torch.equal(packed.target_ids, packed.input_ids[0, packed.completion_index + 1])
    assert packed.completion_cu_seqlens.tolist() == [0, 2, 3, 6]

    # The shared image is encoded once and its 6 feature rows serve both sequences.
    assert torch.equal(packed.pixel_values, pixels)
    assert packed.image_grid_thw.tolist() == [[1, 4, 6]]
    assert packed.image_token_source.tolist() == [0, 1, 2, 3, 4, 5] * 2


def test_several_images_and_dedupe_by_content(model):
    gen = torch.Generator().manual_seed(3)
    two = make_sequence(gen, [(1, 2, 4), (1, 6, 2)], 4)  # 2 + 3 image tokens
    copy = make_sequence(gen, [(1, 2, 4)], 2, pixel_values=two.pixel_values[:8].clone())
    other = make_sequence(gen, [(1, 2, 4)], 2)  # same grid, other pixels
    packed = pack([two, copy, other], model)
    assert packed.image_grid_thw.tolist() == [[1, 2, 4], [1, 6, 2], [1, 2, 4]]
    assert torch.equal(packed.pixel_values[:20], two.pixel_values)
    assert torch.equal(packed.pixel_values[20:], other.pixel_values)
    assert packed.image_token_source.tolist() == [0, 1, 2, 3, 4] + [0, 1] + [5, 6]
    assert int((packed.input_ids == IMAGE).sum()) == packed.image_token_source.numel()


def test_to_moves_tensors_and_keeps_ints(model):
    gen = torch.Generator().manual_seed(0)
    packed = pack([make_sequence(gen, [(1, 2, 2)], 3), make_sequence(gen, [], 1)], model)
    moved = packed.to("meta")
    for name, value in vars(moved).items():
        if isinstance(value, torch.Tensor):
            assert value.device.type == "meta", name
        else:
            assert value == getattr(packed, name), name
    assert isinstance(moved, PackedBatch)


# --------------------------------------------------------------------------------------------
# pack: input checks
# --------------------------------------------------------------------------------------------


def _image_sequence(**changes):
    fields = dict(
        prompt_ids=[1, VISION_START, IMAGE, IMAGE, VISION_END, 2],
        completion_ids=[3, 4],
        pixel_values=torch.randn(8, PIXEL_ROW),
        image_grid_thw=torch.tensor([[1, 2, 4]]),
    )
    fields.update(changes)
    return Sequence(**fields)


@pytest.mark.parametrize(
    "sequence, message",
    [
        (_image_sequence(completion_ids=[]), "sequence 1 has an empty completion"),
        (_image_sequence(prompt_ids=[]), "sequence 1 has an empty prompt"),
        (_image_sequence(completion_ids=[3, IMAGE]), "the completion contains the image token"),
        (_image_sequence(image_grid_thw=torch.tensor([[1, 4, 4]])), "gives 4 image tokens .* holds 2"),
        (_image_sequence(image_grid_thw=torch.tensor([[1, 2, 2], [1, 2, 2]])), "2 image.* but 1 separate run"),
        (_image_sequence(pixel_values=torch.randn(7, PIXEL_ROW)), "pixel_values must be"),
        (_image_sequence(image_grid_thw=None), "go together"),
        (_image_sequence(pixel_values=None, image_grid_thw=None), "image tokens but no pixel_values"),
        (_image_sequence(image_grid_thw=torch.tensor([1, 2, 4])), r"must be \(n, 3\)"),
        (_image_sequence(prompt_ids=[[1, 2]]), "prompt_ids must be 1-D"),
        (_image_sequence(prompt_ids=[1, VIDEO, 2], pixel_values=None, image_grid_thw=None),
         "videos are not supported"),
        (_image_sequence(completion_ids=[1.0, 2.0]), "completion_ids must hold integers"),
    ],
)
def test_bad_input_names_the_problem(model, sequence, message):
    good = Sequence([1, 2, 3], [4])
    with pytest.raises(ValueError, match=message):
        pack([good, sequence], model)


def test_no_samples(model):
    with pytest.raises(ValueError, match="sequences is empty"):
        pack([], model)


# --------------------------------------------------------------------------------------------
# plan_microbatches
# --------------------------------------------------------------------------------------------


def _check_plan(plan, lengths, max_tokens, groups=None):
    """Every sequence once, every micro-batch non-empty, sorted and within the budget, the
    fullest first; a group that fits the budget in one micro-batch."""
    placed = sorted(i for batch in plan for i in batch)
    assert placed == list(range(len(lengths))), "a sequence is missing or placed twice"
    loads = [sum(lengths[i] for i in batch) for batch in plan]
    for batch, load in zip(plan, loads):
        assert batch and batch == sorted(batch) and load <= max_tokens
    assert loads == sorted(loads, reverse=True)
    if groups is not None:
        homes = {}
        for k, batch in enumerate(plan):
            for i in batch:
                homes.setdefault(groups[i], set()).add(k)
        for g, h in homes.items():
            if sum(n for n, key in zip(lengths, groups) if key == g) <= max_tokens:
                assert len(h) == 1, f"group {g} fits the budget but was split"


def test_plan_properties_on_random_lengths():
    rng = random.Random(1234)
    for _ in range(400):
        max_tokens = rng.randint(1, 5000)
        n = rng.randint(0, 80)
        lengths = [rng.randint(1, max_tokens) for _ in range(n)]
        plan = plan_microbatches(lengths, max_tokens)
        _check_plan(plan, lengths, max_tokens)
        assert plan == plan_microbatches(list(lengths), max_tokens), "not deterministic"


def test_plan_properties_with_groups():
    rng = random.Random(99)
    for _ in range(300):
        max_tokens = rng.randint(1, 3000)
        n = rng.randint(0, 60)
        lengths = [rng.randint(1, rng.choice([max_tokens, max(1, max_tokens // 6)])) for _ in range(n)]
        groups = [rng.randint(0, max(1, n // 3)) for _ in range(n)]
        plan = plan_microbatches(lengths, max_tokens, groups=groups)
        _check_plan(plan, lengths, max_tokens, groups)
        assert plan == plan_microbatches(lengths, max_tokens, groups=list(groups))


def test_plan_on_grpo_like_lengths():
    """One rank's share of a step: 16 prompts x G = 4 completions."""
    rng = random.Random(7)
    prompts = [rng.randint(300, 800) for _ in range(16)]
    lengths = [prompts[i // 4] + rng.randint(50, 1024) for i in range(64)]
    fewest = math.ceil(sum(lengths) / 8192)  # micro-batches at 100% fill
    plan = plan_microbatches(lengths, 8192)
    _check_plan(plan, lengths, 8192)
    assert len(plan) <= fewest + 1
    # With the prompt as group, the 4 completions of each prompt share a micro-batch.
    groups = [i // 4 for i in range(64)]
    plan = plan_microbatches(lengths, 8192, groups=groups)
    _check_plan(plan, lengths, 8192, groups)
    assert len(plan) <= fewest + 1


def test_plan_groups_over_budget_are_split_into_parts():
    # Group "a" (4 + 4 + 3 = 11 tokens) exceeds the budget of 8: parts [4, 4] and [3].
    assert plan_microbatches([4, 4, 3, 2], 8, groups=["a", "a", "a", "b"]) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="3 groups for 4 lengths"):
        plan_microbatches([4, 4, 3, 2], 8, groups=["a", "a", "b"])


def test_plan_small_cases():
    assert plan_microbatches([5, 5, 5], 5) == [[0], [1], [2]]
    assert plan_microbatches([3, 1, 2], 10) == [[0, 1, 2]]
    assert plan_microbatches([], 10) == []
    # First-fit decreasing: 9 and 8 open two micro-batches; the first 2 fits only beside the
    # 8, the second opens a third; the fullest first.
    assert plan_microbatches([9, 8, 2, 2], 10) == [[1, 2], [0], [3]]
    assert plan_microbatches([9, 8, 2, 1], 10) == [[0, 3], [1, 2]]


def test_plan_refuses_a_sequence_over_budget():
    with pytest.raises(ValueError, match="sequence 2 has 11 tokens, more than .* max_tokens=10"):
        plan_microbatches([3, 10, 11], 10)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        plan_microbatches([1], 0)
    with pytest.raises(ValueError, match="sequence 0 has length 0"):
        plan_microbatches([0], 4)


# --------------------------------------------------------------------------------------------
# pack(share_prompts=True): the shared-prompt layout
# --------------------------------------------------------------------------------------------


def test_shared_layout_by_hand(model):
    # The docstring's example: A and C share a prompt with a 2x3-token image; B is alone.
    pixels, prompt_a, (a, b, c) = _three_samples()
    packed = pack([a, b, c], model, share_prompts=True)

    assert packed.input_ids.tolist() == [prompt_a + [7, 8] + [13, 14, 15] + [9, 10, 11, 12]]
    assert packed.num_tokens == 19 and packed.num_sequences == 3 and packed.shares_prompts
    assert packed.cu_seqlens.tolist() == [0, 10, 12, 15, 19] and packed.max_seqlen == 10
    prompt_rows = list(range(10))
    assert packed.key_index.tolist() == prompt_rows + prompt_rows + [10, 11] + prompt_rows + [12, 13, 14] + [
        15, 16, 17, 18]
    assert packed.cu_seqlens_k.tolist() == [0, 10, 22, 35, 39] and packed.max_seqlen_k == 13
    assert packed.cu_seqlens_k.dtype == torch.int32 and packed.key_index.dtype == torch.int64

    # Each completion's positions continue from the prompt's end (M-RoPE: 5 after the image).
    t_a = [0, 1, 2, 2, 2, 2, 2, 2, 5, 6]
    w_a = [0, 1, 2, 3, 4, 2, 3, 4, 5, 6]
    pos = packed.position_ids[:, 0]
    assert pos[0].tolist() == list(range(10)) + [10, 11] + [10, 11, 12] + [0, 1, 2, 3]
    assert pos[1].tolist() == t_a + [7, 8] + [7, 8, 9] + [0, 1, 2, 3]
    assert pos[3].tolist() == w_a + [7, 8] + [7, 8, 9] + [0, 1, 2, 3]

    # Sequence order on the loss side; the prompt's last row (9) predicts both A's and C's first token.
    assert packed.completion_index.tolist() == [9, 10, 17, 9, 12, 13]
    assert packed.target_ids.tolist() == [7, 8, 12, 13, 14, 15]
    assert packed.completion_cu_seqlens.tolist() == [0, 2, 3, 6]
    assert packed.image_token_source.tolist() == [0, 1, 2, 3, 4, 5]  # the image appears once
    assert packed.mm_token_type_ids.tolist() == [[0, 0] + [1] * 6 + [0] * 11]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_shared_positions_and_targets_are_the_unshared_ones(family):
    """Every completion token sits at the same M-RoPE position and is predicted by a row with
    the same position as in the unshared layout; prompts appear once per group."""
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(5)
    sequences = []
    for grids, lens in [([(1, 4, 6)], [3, 1, 9, 2]), ([], [4, 4]), ([(1, 2, 2), (1, 6, 4)], [1])]:
        sequences += make_group(gen, grids, lens)
    sequences.insert(3, sequences.pop(5))  # groups interleaved in the input order
    unshared, shared = pack(sequences, model), pack(sequences, model, share_prompts=True)
    for name in ("target_ids", "completion_cu_seqlens"):
        assert torch.equal(getattr(shared, name), getattr(unshared, name)), name
    idx_s, idx_u = shared.completion_index, unshared.completion_index
    assert torch.equal(shared.position_ids[:, 0, idx_s], unshared.position_ids[:, 0, idx_u])
    assert torch.equal(shared.input_ids[0, idx_s], unshared.input_ids[0, idx_u])
    # Rows that hold completion tokens (all but each sequence's first predicting row, the
    # prompt's last) are the sequences' own in both layouts.
    tokens = torch.ones_like(idx_s, dtype=torch.bool)
    tokens[shared.completion_cu_seqlens[:-1].long()] = False
    assert torch.equal(shared.input_ids[0, idx_s[tokens]], shared.target_ids[torch.roll(tokens, -1)])
    assert len(set(idx_s[tokens].tolist())) == int(tokens.sum())  # no row shared between completions
    prompts = sum(len(ids) for ids in {tuple(s.prompt_ids.tolist()) for s in sequences})  # 3 distinct
    assert shared.num_tokens == prompts + sum(len(s.completion_ids) for s in sequences)
    assert torch.equal(shared.pixel_values, unshared.pixel_values)


def test_shared_layout_of_single_completions_is_the_unshared_one(model):
    gen = torch.Generator().manual_seed(8)
    sequences = [make_sequence(gen, [(1, 2, 4)], 3), make_sequence(gen, [], 1), make_sequence(gen, [(1, 2, 2)], 6)]
    shared, unshared = pack(sequences, model, share_prompts=True), pack(sequences, model)
    assert not shared.shares_prompts and shared.cu_seqlens_k is None
    for name, value in vars(unshared).items():
        same = torch.equal(value, getattr(shared, name)) if isinstance(value, torch.Tensor) else value == getattr(
            shared, name)
        assert same, name


def test_equal_prompts_with_other_pixels_are_not_shared(model):
    gen = torch.Generator().manual_seed(2)
    a = make_sequence(gen, [(1, 2, 4)], 3)
    b = make_sequence(gen, [(1, 2, 4)], 2)  # other pixels...
    b.prompt_ids = a.prompt_ids  # ... behind the same ids
    c = Sequence(a.prompt_ids, [5], a.pixel_values.clone(), a.image_grid_thw)  # equal pixels, another tensor
    packed = pack([a, b, c], model, share_prompts=True)
    P = len(a.prompt_ids)
    assert packed.num_tokens == P + 3 + 1 + P + 2  # [a's prompt, a, c] and [b's prompt, b]
    assert packed.completion_index.tolist()[-1] == P - 1


# --------------------------------------------------------------------------------------------
# plan_shared_microbatches
# --------------------------------------------------------------------------------------------


def _group_sequences(prompt_lens, completion_lens):
    """Text-only sequences: group g has a prompt of prompt_lens[g] tokens and completions
    completion_lens[g]; different groups have different prompts."""
    sequences = []
    for g, (p, lens) in enumerate(zip(prompt_lens, completion_lens)):
        prompt = [1 + g] * p  # distinct per group
        sequences += [Sequence(prompt, [3] * c) for c in lens]
    return sequences


def test_shared_plan_properties_on_random_groups():
    rng = random.Random(15)
    for _ in range(150):
        budget = rng.randint(20, 400)
        n_groups = rng.randint(0, 8)
        prompt_lens = [rng.randint(1, budget // 2) for _ in range(n_groups)]
        completion_lens = [[rng.randint(1, budget - p) for _ in range(rng.randint(1, 8))] for p in prompt_lens]
        sequences = _group_sequences(prompt_lens, completion_lens)
        plan = plan_shared_microbatches(sequences, budget)
        placed = sorted(i for batch in plan.microbatches for i in batch)
        assert placed == list(range(len(sequences))), "a sequence is missing or placed twice"
        group_of = [g for g, lens in enumerate(completion_lens) for _ in lens]
        rows = 0
        for batch in plan.microbatches:
            assert batch == sorted(batch) and batch
            groups = {group_of[i] for i in batch}
            size = sum(prompt_lens[g] for g in groups) + sum(len(sequences[i].completion_ids) for i in batch)
            assert size <= budget
            rows += size
        assert rows == plan.tokens
        over = sum(p + sum(lens) > budget for p, lens in zip(prompt_lens, completion_lens))
        assert plan.split_groups == over
        homes = {}
        for k, batch in enumerate(plan.microbatches):
            for i in batch:
                homes.setdefault(group_of[i], set()).add(k)
        for g, h in homes.items():  # a group that fits is never split
            fits = prompt_lens[g] + sum(completion_lens[g]) <= budget
            assert len(h) == 1 or not fits


def test_shared_plan_rows_are_what_pack_computes(model):
    sequences = _group_sequences([7, 3, 12], [[2, 9, 1, 4], [5], [30, 1, 6]])
    plan = plan_shared_microbatches(sequences, 45)  # group 2 (12 + 37 = 49) is split
    assert plan.split_groups == 1
    rows = [pack([sequences[i] for i in batch], model, share_prompts=True).num_tokens for batch in plan.microbatches]
    assert all(r <= 45 for r in rows) and sum(rows) == plan.tokens == 7 + 16 + 3 + 5 + 2 * 12 + 37


def test_shared_plan_refusals():
    assert plan_shared_microbatches([], 10) == SharedPlan([], 0, 0)
    with pytest.raises(ValueError, match="sequence 1 has 11 tokens, more than .* max_tokens=10"):
        plan_shared_microbatches([Sequence([1, 2], [3]), Sequence([1] * 6, [3] * 5)], 10)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        plan_shared_microbatches([Sequence([1], [2])], 0)


def test_plan_batch_refuses_advantages_that_do_not_match(model):
    from r1vl.config import MemoryOptions
    from r1vl.update.microbatches import plan_batch

    gen = torch.Generator().manual_seed(3)
    sequences = make_group(gen, [(1, 4, 6)], [3, 2, 5])
    cfg = MemoryOptions(share_prompts=True, micro_batch_tokens=4096)
    batch = plan_batch(sequences, torch.tensor([1.0, -1.0, 0.5]), 3, model, cfg, torch.device("cpu"))
    assert sorted(i for mb in batch.microbatches for i in mb.indices) == [0, 1, 2]
    assert batch.completion_tokens == 10
    with pytest.raises(ValueError, match="one per sequence"):
        plan_batch(sequences, torch.zeros(2), 3, model, cfg, torch.device("cpu"))
    with pytest.raises(ValueError, match="groups of group_size=2"):
        plan_batch(sequences, torch.zeros(3), 2, model, cfg, torch.device("cpu"))
