"""pack: the layout of a packed row, checked by hand; its input checks. plan_microbatches:
its invariants over many random length lists."""
import math
import random

import pytest
import torch
from tiny_qwen_vl import IMAGE, PIXEL_ROW, VIDEO, VISION_END, VISION_START, make_sample, tiny_model

from r1vl.packing import PackedBatch, Sample, pack, plan_microbatches


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2_vl")


# --------------------------------------------------------------------------------------------
# pack: layout
# --------------------------------------------------------------------------------------------


def test_layout_by_hand(model):
    # A: one 4x6-patch image (2x3 merged tokens), completion of 2; B: text only, completion
    # of 1; C: GRPO sibling of A (same prompt, same pixel tensor), completion of 3.
    pixels = torch.randn(24, PIXEL_ROW)
    prompt_a = [5, VISION_START] + [IMAGE] * 6 + [VISION_END, 6]  # P = 10
    a = Sample(prompt_a, [7, 8], pixels, torch.tensor([[1, 4, 6]]))
    b = Sample([9, 10, 11], [12])
    c = Sample(prompt_a, [13, 14, 15], pixels, torch.tensor([[1, 4, 6]]))
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
    two = make_sample(gen, [(1, 2, 4), (1, 6, 2)], 4)  # 2 + 3 image tokens
    copy = make_sample(gen, [(1, 2, 4)], 2, pixel_values=two.pixel_values[:8].clone())
    other = make_sample(gen, [(1, 2, 4)], 2)  # same grid, other pixels
    packed = pack([two, copy, other], model)
    assert packed.image_grid_thw.tolist() == [[1, 2, 4], [1, 6, 2], [1, 2, 4]]
    assert torch.equal(packed.pixel_values[:20], two.pixel_values)
    assert torch.equal(packed.pixel_values[20:], other.pixel_values)
    assert packed.image_token_source.tolist() == [0, 1, 2, 3, 4] + [0, 1] + [5, 6]
    assert int((packed.input_ids == IMAGE).sum()) == packed.image_token_source.numel()


def test_to_moves_tensors_and_keeps_ints(model):
    gen = torch.Generator().manual_seed(0)
    packed = pack([make_sample(gen, [(1, 2, 2)], 3), make_sample(gen, [], 1)], model)
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


def _image_sample(**changes):
    fields = dict(
        prompt_ids=[1, VISION_START, IMAGE, IMAGE, VISION_END, 2],
        completion_ids=[3, 4],
        pixel_values=torch.randn(8, PIXEL_ROW),
        image_grid_thw=torch.tensor([[1, 2, 4]]),
    )
    fields.update(changes)
    return Sample(**fields)


@pytest.mark.parametrize(
    "sample, message",
    [
        (_image_sample(completion_ids=[]), "sample 1 has an empty completion"),
        (_image_sample(prompt_ids=[]), "sample 1 has an empty prompt"),
        (_image_sample(completion_ids=[3, IMAGE]), "the completion contains the image token"),
        (_image_sample(image_grid_thw=torch.tensor([[1, 4, 4]])), "gives 4 image tokens .* holds 2"),
        (_image_sample(image_grid_thw=torch.tensor([[1, 2, 2], [1, 2, 2]])), "2 image.* but 1 separate run"),
        (_image_sample(pixel_values=torch.randn(7, PIXEL_ROW)), "pixel_values must be"),
        (_image_sample(image_grid_thw=None), "go together"),
        (_image_sample(pixel_values=None, image_grid_thw=None), "image tokens but no pixel_values"),
        (_image_sample(image_grid_thw=torch.tensor([1, 2, 4])), r"must be \(n, 3\)"),
        (_image_sample(prompt_ids=[[1, 2]]), "prompt_ids must be 1-D"),
        (_image_sample(prompt_ids=[1, VIDEO, 2], pixel_values=None, image_grid_thw=None),
         "videos are not supported"),
        (_image_sample(completion_ids=[1.0, 2.0]), "completion_ids must hold integers"),
    ],
)
def test_bad_input_names_the_problem(model, sample, message):
    good = Sample([1, 2, 3], [4])
    with pytest.raises(ValueError, match=message):
        pack([good, sample], model)


def test_no_samples(model):
    with pytest.raises(ValueError, match="samples is empty"):
        pack([], model)


# --------------------------------------------------------------------------------------------
# plan_microbatches
# --------------------------------------------------------------------------------------------


def _check_plan(plan, lengths, max_tokens, world_size, balance=None):
    """balance: the allowed spread of the ranks' totals, default the longest sequence."""
    assert len(plan) == world_size
    steps = len(plan[0])
    assert all(len(rank) == steps for rank in plan), "ranks differ in micro-batch count"
    placed = sorted(i for rank in plan for batch in rank for i in batch)
    assert placed == list(range(len(lengths))), "a sequence is missing or placed twice"
    for rank in plan:
        for batch in rank:
            assert sum(lengths[i] for i in batch) <= max_tokens
            assert batch == sorted(batch)
        if any(len(batch) == 0 for batch in rank):  # empty only when unavoidable
            assert sum(len(batch) for batch in rank) < steps
    loads = [sum(lengths[i] for batch in rank for i in batch) for rank in plan]
    if lengths:
        bound = max(lengths) if balance is None else balance
        assert max(loads) - min(loads) <= bound, "ranks unbalanced by more than one unit"


def test_plan_properties_on_random_lengths():
    rng = random.Random(1234)
    for _ in range(400):
        max_tokens = rng.randint(1, 5000)
        world_size = rng.randint(1, 8)
        n = rng.randint(0, 80)
        lengths = [rng.randint(1, max_tokens) for _ in range(n)]
        plan = plan_microbatches(lengths, max_tokens, world_size)
        _check_plan(plan, lengths, max_tokens, world_size)
        assert plan == plan_microbatches(list(lengths), max_tokens, world_size), "not deterministic"


def test_plan_properties_with_groups():
    rng = random.Random(99)
    for _ in range(300):
        max_tokens = rng.randint(1, 3000)
        world_size = rng.randint(1, 6)
        n = rng.randint(0, 60)
        lengths = [rng.randint(1, max_tokens) for _ in range(n)]
        groups = [rng.randint(0, max(1, n // 3)) for _ in range(n)]
        plan = plan_microbatches(lengths, max_tokens, world_size, groups=groups)
        totals = {}
        for g, n_tokens in zip(groups, lengths):
            totals[g] = totals.get(g, 0) + n_tokens
        # A unit is a group, or a budget-sized part of a group over the budget.
        largest_unit = max([min(t, max_tokens) for t in totals.values()], default=0)
        _check_plan(plan, lengths, max_tokens, world_size, balance=largest_unit)
        assert plan == plan_microbatches(lengths, max_tokens, world_size, groups=list(groups))


def test_plan_on_grpo_like_lengths():
    rng = random.Random(7)
    prompts = [rng.randint(300, 800) for _ in range(64)]
    lengths = [prompts[i // 4] + rng.randint(50, 1024) for i in range(256)]
    plan = plan_microbatches(lengths, 8192, 4)
    _check_plan(plan, lengths, 8192, 4)
    fewest = math.ceil(sum(lengths) / (4 * 8192))  # micro-batches per rank at 100% fill
    assert len(plan[0]) <= fewest + 1

    # With the prompt as group, the 4 completions of each prompt share a micro-batch.
    groups = [i // 4 for i in range(256)]
    plan = plan_microbatches(lengths, 8192, 4, groups=groups)
    _check_plan(plan, lengths, 8192, 4, balance=max(sum(lengths[4 * g : 4 * g + 4]) for g in range(64)))
    homes = {}
    for r, rank in enumerate(plan):
        for k, batch in enumerate(rank):
            for i in batch:
                homes.setdefault(groups[i], set()).add((r, k))
    assert all(len(h) == 1 for h in homes.values()), "a group was split"
    assert len(plan[0]) <= fewest + 1


def test_plan_groups_over_budget_are_split_into_parts():
    # Group "a" (4 + 4 + 3 = 11 tokens) exceeds the budget of 8: parts [4, 4] and [3].
    plan = plan_microbatches([4, 4, 3, 2], 8, 1, groups=["a", "a", "a", "b"])
    assert plan == [[[0, 1], [2, 3]]]
    with pytest.raises(ValueError, match="3 groups for 4 lengths"):
        plan_microbatches([4, 4, 3, 2], 8, 1, groups=["a", "a", "b"])


def test_plan_small_cases():
    assert plan_microbatches([5, 5, 5], 5, 2) == [[[0], [2]], [[1], []]]
    assert plan_microbatches([3, 1, 2], 10, 1) == [[[0, 1, 2]]]
    assert plan_microbatches([], 10, 3) == [[], [], []]
    # Rank 0 gets [9, 2] (two micro-batches), rank 1 gets [8, 2] (fits in one): rank 1's is
    # split so that both step twice, rather than stepping once on an empty micro-batch.
    assert plan_microbatches([9, 8, 2, 2], 10, 2) == [[[0], [3]], [[1], [2]]]


def test_plan_refuses_a_sequence_over_budget():
    with pytest.raises(ValueError, match="sequence 2 has 11 tokens, more than .* max_tokens=10"):
        plan_microbatches([3, 10, 11], 10, 2)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        plan_microbatches([1], 0, 1)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        plan_microbatches([1], 4, 0)
    with pytest.raises(ValueError, match="sequence 0 has length 0"):
        plan_microbatches([0], 4, 1)
