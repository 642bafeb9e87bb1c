"""The vision towers call the attention once per image (per window) per layer, without
boundaries: the one-segment boundaries are made once per size and device, not copied from
the host at every call (a blocking copy per image per layer on a GPU)."""
import pytest
import torch
from tiny_qwen_vl import FAMILIES, make_sequence, tiny_model

import r1vl.model.attention as attention
from r1vl.model.attention import use_varlen_attention, varlen_attention


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_calls_reuse_their_boundaries(family, monkeypatch):
    gen = torch.Generator().manual_seed(9)
    grids = [(1, 4, 6), (1, 6, 4), (1, 4, 4)]
    samples = [make_sequence(gen, [grid], 2, family=family) for grid in grids]
    model = tiny_model(family, seed=9)
    use_varlen_attention(model, "sdpa")
    boundaries = []

    def spy(query, key, value, cu_seqlens, max_seqlen, *, causal, **kwargs):
        if not causal:  # the vision tower's calls
            boundaries.append(cu_seqlens)  # kept alive: distinct tensors keep distinct ids
        return varlen_attention(query, key, value, cu_seqlens, max_seqlen, causal=causal, **kwargs)

    monkeypatch.setattr(attention, "varlen_attention", spy)
    with torch.no_grad():
        for _ in range(2):
            for s in samples:
                model.model.get_image_features(torch.as_tensor(s.pixel_values), torch.as_tensor(s.image_grid_thw))
    distinct = {id(cu) for cu in boundaries}
    sizes = {int(cu[-1]) for cu in boundaries}
    assert len(boundaries) >= 2 * len(samples) * model.config.vision_config.depth
    assert len(distinct) == len(sizes), f"{len(distinct)} boundary tensors made for {len(sizes)} segment sizes"
    assert all(cu.dtype == torch.int32 and cu.tolist() == [0, int(cu[-1])] for cu in boundaries)
