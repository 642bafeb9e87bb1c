"""varlen attention against a float64 per-sequence softmax reference; its transformers
registration, backend choice and refusals."""
import logging

import pytest
import torch
from tiny_qwen_vl import IMAGE, make_sample, tiny_model
from transformers import AttentionInterface

from r1vl.model.attention import BACKENDS, _sdpa_masked, cu_seqlens_from_positions, implementation_name, pick_backend, use_varlen_attention, varlen_attention
from r1vl.update.forward import completion_hidden
from r1vl.update.packing import pack


def reference_attention(q, k, v, lengths, causal, scale):
    """Plain softmax attention of each sequence alone, in float64. q (T, Hq, D), k/v (T, Hkv, D)."""
    groups = q.shape[1] // k.shape[1]
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = (x[start : start + n].double().transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        scores = qs @ ks.transpose(1, 2) * scale  # (Hq, n, n)
        if causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out.append((scores.softmax(-1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(out)


def _cu(lengths):
    return torch.tensor([0] + lengths).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])
def test_sdpa_backend_matches_reference(causal, heads):
    gen = torch.Generator().manual_seed(11)
    lengths = [1, 7, 2, 13, 5]
    T, (hq, hkv), D = sum(lengths), heads, 24
    q = torch.randn(T, hq, D, generator=gen)
    k = torch.randn(T, hkv, D, generator=gen)
    v = torch.randn(T, hkv, D, generator=gen)
    out = varlen_attention(q, k, v, _cu(lengths), max(lengths), causal=causal, scale=0.3, backend="sdpa")
    assert out.shape == (T, hq, D) and out.dtype == torch.float32
    ref = reference_attention(q, k, v, lengths, causal, 0.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_masked_sdpa_on_cpu_matches_per_segment_sdpa(causal):
    """The opt-in "sdpa_masked" backend (one call with a segment-diagonal mask, on a CPU too),
    with a zero-length sequence, forward and backward against the reference and the CPU's
    per-segment "sdpa"."""
    gen = torch.Generator().manual_seed(12)
    lengths = [3, 0, 9, 1, 6]
    T, D = sum(lengths), 16
    q = torch.randn(T, 6, D, generator=gen, requires_grad=True)
    k = torch.randn(T, 2, D, generator=gen, requires_grad=True)
    v = torch.randn(T, 2, D, generator=gen, requires_grad=True)
    masked = varlen_attention(q, k, v, _cu(lengths), max(lengths), causal=causal, scale=0.25,
                              backend="sdpa_masked")
    torch.testing.assert_close(masked.double(), reference_attention(q, k, v, lengths, causal, 0.25),
                               atol=1e-5, rtol=1e-5)
    grads_masked = torch.autograd.grad(masked.square().sum(), (q, k, v))
    segments = varlen_attention(q, k, v, _cu(lengths), max(lengths), causal=causal, scale=0.25, backend="sdpa")
    grads_segments = torch.autograd.grad(segments.square().sum(), (q, k, v))
    torch.testing.assert_close(masked, segments, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_masked, grads_segments):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_unknown_backend():
    q = torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        varlen_attention(q, q, q, _cu([3]), 3, causal=True, backend="triton")


def test_cu_seqlens_from_positions():
    positions = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3]])
    cu, max_len = cu_seqlens_from_positions(positions)
    assert cu.tolist() == [0, 3, 4, 8] and cu.dtype == torch.int32 and max_len == 4
    with pytest.raises(ValueError, match="first position must be 0"):
        cu_seqlens_from_positions(torch.tensor([1, 2, 0]))


# --------------------------------------------------------------------------------------------
# Registration and choice
# --------------------------------------------------------------------------------------------


def test_cpu_picks_sdpa_registers_and_logs(caplog):
    model = tiny_model("qwen2_vl")
    with caplog.at_level(logging.INFO, logger="r1vl.model.attention"):
        assert use_varlen_attention(model) == "sdpa"
    assert "backend sdpa" in caplog.text
    name = implementation_name("sdpa")
    assert name in AttentionInterface._global_mapping
    assert model.model.language_model.config._attn_implementation == name
    assert model.model.visual.config._attn_implementation == name
    assert pick_backend(torch.device("cpu"), torch.bfloat16) == "sdpa"
    assert pick_backend(torch.device("cuda"), torch.float32) == "sdpa"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_both_towers_run_through_the_registered_backend(family, monkeypatch):
    """On the pinned transformers, the switch takes in the language model and the vision
    tower alike: every attention layer of both calls r1vl's function (the tower once per
    image, its segment non-causal), and the packed forward equals transformers' own sdpa."""
    gen = torch.Generator().manual_seed(9)
    samples = [make_sample(gen, [(1, 4, 6)], 3), make_sample(gen, [(1, 6, 4)], 2)]
    reference = tiny_model(family, seed=9)
    model = tiny_model(family, seed=9)
    packed = pack(samples, model)
    inputs = dict(input_ids=packed.input_ids, position_ids=packed.position_ids,
                  pixel_values=packed.pixel_values, image_grid_thw=packed.image_grid_thw,
                  mm_token_type_ids=(packed.input_ids == IMAGE).int(), use_cache=False)
    expected = reference.model(**inputs).last_hidden_state

    import r1vl.model.attention as attention

    calls = []

    def spy(query, key, value, cu_seqlens, max_seqlen, *, causal, **kwargs):
        calls.append((causal, cu_seqlens.numel() - 1, query.shape[0]))
        return varlen_attention(query, key, value, cu_seqlens, max_seqlen, causal=causal, **kwargs)

    monkeypatch.setattr(attention, "varlen_attention", spy)
    use_varlen_attention(model, "sdpa")
    got = model.model(**inputs).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    text_layers = model.config.text_config.num_hidden_layers
    vision_layers = model.config.vision_config.depth
    patches = [int(t.prod()) for t in packed.image_grid_thw]
    vision_calls = [c for c in calls if not c[0]]
    text_calls = [c for c in calls if c[0]]
    assert len(text_calls) == text_layers and all(c[1] == len(samples) for c in text_calls)
    # One segment a call (an image, or a window of one under Qwen2.5-VL's windowed layers),
    # every patch once per layer.
    assert all(c[1] == 1 for c in vision_calls)
    assert sum(c[2] for c in vision_calls) == vision_layers * sum(patches)
    if family == "qwen2_vl":
        assert sorted(c[2] for c in vision_calls) == sorted(patches * vision_layers)


@pytest.mark.parametrize("backend", ["flash_attn", "varlen_attn"])
def test_forcing_a_gpu_backend_on_cpu_is_refused(backend):
    with pytest.raises(ValueError, match="needs a CUDA model in fp16/bf16"):
        use_varlen_attention(tiny_model("qwen2_vl"), backend)


def test_forcing_an_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        use_varlen_attention(tiny_model("qwen2_vl"), "xformers")


def test_padded_batch_is_refused():
    model = tiny_model("qwen2_vl")
    use_varlen_attention(model, "sdpa")
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    with pytest.raises(ValueError, match="packed batches only"):
        model(input_ids=ids, attention_mask=(ids != 0).long(), use_cache=False)


def test_boundaries_from_positions_when_not_passed():
    """A plain transformers forward of a packed row (no cu_seq_lens given): the attention
    finds the sequences from the restarting text positions, and the vision tower's own
    per-image boundaries still reach it. Same result as completion_hidden."""
    model = tiny_model("qwen2_5_vl", seed=5)
    use_varlen_attention(model, "sdpa")
    gen = torch.Generator().manual_seed(5)
    samples = [make_sample(gen, [(1, 4, 10)], 3), make_sample(gen, [], 4), make_sample(gen, [(1, 6, 4)], 2)]
    packed = pack(samples, model)
    hidden = completion_hidden(model, packed)
    out = model.model(
        input_ids=packed.input_ids, position_ids=packed.position_ids,
        pixel_values=packed.pixel_values, image_grid_thw=packed.image_grid_thw,
        mm_token_type_ids=(packed.input_ids == IMAGE).int(), use_cache=False,
    )
    rows = out.last_hidden_state[0, packed.completion_index]
    torch.testing.assert_close(rows, hidden, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# GPU backends against sdpa (skipped without a GPU)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in ("sdpa", "sdpa_masked")])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_backend_matches_reference(backend, causal):
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
    gen = torch.Generator().manual_seed(2)
    lengths = [1, 300, 17, 1024, 77]
    T, hq, hkv, D = sum(lengths), 8, 2, 64
    q, k, v = (torch.randn(T, h, D, generator=gen) for h in (hq, hkv, hkv))
    ref = reference_attention(q, k, v, lengths, causal, D**-0.5)
    cu = _cu(lengths).cuda()
    # bf16 tolerance: at most 2x the error of plain sdpa run in bf16 on the same inputs.
    low = [x.cuda().bfloat16() for x in (q, k, v)]
    sdpa = varlen_attention(*low, cu, max(lengths), causal=causal, backend="sdpa")
    sdpa_err = (sdpa.double().cpu() - ref).abs().max()
    out = varlen_attention(*low, cu, max(lengths), causal=causal, backend=backend)
    assert out.shape == (T, hq, D) and out.dtype == torch.bfloat16
    assert (out.double().cpu() - ref).abs().max() <= 2 * sdpa_err + 1e-3


# --------------------------------------------------------------------------------------------
# Shared-prompt layout: segments that see a prefix of other rows (r1vl.update.packing share_prompts)
# --------------------------------------------------------------------------------------------


def shared_layout(groups):
    """cu_seqlens, key_index, cu_seqlens_k, max lengths for `groups` = [(P, [C, ...])] laid
    out as r1vl.update.packing does: [prompt, c1, ..., cG]; a group with one completion is one
    plain segment of P + C rows."""
    seg, keys, key_lens, offset = [], [], [], 0
    for p, completions in groups:
        if len(completions) == 1:
            n = p + completions[0]
            seg.append(n)
            keys.append(torch.arange(offset, offset + n))
            key_lens.append(n)
            offset += n
            continue
        prompt = torch.arange(offset, offset + p)
        seg.append(p)
        keys.append(prompt)
        key_lens.append(p)
        offset += p
        for c in completions:
            seg.append(c)
            keys += [prompt, torch.arange(offset, offset + c)]
            key_lens.append(p + c)
            offset += c
    return _cu(seg), torch.cat(keys), _cu(key_lens), max(seg), max(key_lens)


def reference_shared_attention(q, k, v, cu, key_index, cu_k, causal, scale):
    """Each segment's softmax over its gathered keys, causal aligned to the bottom right, in
    float64 with an explicit mask; autograd through the gather sums the prompt's gradients."""
    groups = q.shape[1] // k.shape[1]
    kg, vg = k.double()[key_index], v.double()[key_index]
    out = []
    for s in range(cu.numel() - 1):
        q0, q1, k0, k1 = int(cu[s]), int(cu[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        qs = q[q0:q1].double().transpose(0, 1)
        ks, vs = (x[k0:k1].transpose(0, 1).repeat_interleave(groups, 0) for x in (kg, vg))
        scores = qs @ ks.transpose(1, 2) * scale  # (Hq, Lq, Lk)
        if causal:
            lq, lk = q1 - q0, k1 - k0
            visible = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
            scores = scores.masked_fill(~visible, float("-inf"))
        out.append((scores.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(out)


SHARED_GROUPS = [(9, [1, 6, 3]), (4, [5]), (13, [2, 11, 1, 7, 4, 8, 1, 3]), (1, [1, 2])]


@pytest.mark.parametrize("form", ["per_segment", "masked"])
@pytest.mark.parametrize("causal", [True, False])
def test_shared_prefix_sdpa_forms_match_reference_forward_and_backward(form, causal):
    """Both sdpa forms (per segment: the CPU path; one masked call: the GPU fallback) against
    the float64 reference, outputs and the gradients of q, k and v."""
    gen = torch.Generator().manual_seed(21)
    cu, key_index, cu_k, max_q, max_k = shared_layout(SHARED_GROUPS)
    T, hq, hkv, D = int(cu[-1]), 6, 2, 16
    q, k, v = (torch.randn(T, h, D, generator=gen, requires_grad=True) for h in (hq, hkv, hkv))
    grad_out = torch.randn(T, hq, D, generator=gen)
    if form == "per_segment":
        out = varlen_attention(q, k, v, cu, max_q, causal=causal, scale=0.4, backend="sdpa",
                               key_index=key_index, cu_seqlens_k=cu_k, max_seqlen_k=max_k)
    else:
        out = _sdpa_masked(q, k.index_select(0, key_index), v.index_select(0, key_index), cu, cu_k, causal, 0.4, 0.0)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = reference_shared_attention(q, k, v, cu, key_index, cu_k, causal, 0.4)
    expected = torch.autograd.grad(ref, (q, k, v), grad_out.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for name, g, e in zip("qkv", got, expected):
        torch.testing.assert_close(g.double(), e.double(), atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_masked_form_equals_per_segment_without_prefix():
    gen = torch.Generator().manual_seed(4)
    lengths = [3, 1, 8, 5]
    q, k, v = (torch.randn(sum(lengths), 2, 8, generator=gen) for _ in range(3))
    cu = _cu(lengths)
    per_segment = varlen_attention(q, k, v, cu, 8, causal=True, backend="sdpa")
    torch.testing.assert_close(_sdpa_masked(q, k, v, cu, cu, True, None, 0.0), per_segment, atol=1e-6, rtol=1e-6)


def test_key_index_needs_its_boundaries():
    q = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="key_index needs cu_seqlens_k"):
        varlen_attention(q, q, q, _cu([2, 2]), 2, causal=True, key_index=torch.arange(4))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "sdpa"])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_backend_shared_prefix_matches_reference(backend, causal):
    """flash_attn / varlen_attn on the shared-prompt layout (bottom-right causal over gathered
    prompt keys), forward and backward, in bf16 against the float64 reference: at most 2x
    the error of the masked sdpa form in bf16 on the same inputs."""
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
    gen = torch.Generator().manual_seed(3)
    groups = [(512, [50, 1024, 300, 1]), (37, [5]), (200, [1, 2, 3, 700, 9, 60, 128, 1])]
    cu, key_index, cu_k, max_q, max_k = shared_layout(groups)
    T, hq, hkv, D = int(cu[-1]), 8, 2, 64
    q, k, v = (torch.randn(T, h, D, generator=gen, requires_grad=True) for h in (hq, hkv, hkv))
    grad_out = torch.randn(T, hq, D, generator=gen)
    ref = reference_shared_attention(q, k, v, cu, key_index, cu_k, causal, D**-0.5)
    expected = (ref, *torch.autograd.grad(ref, (q, k, v), grad_out.double()))

    def run(which):
        low = [x.detach().cuda().bfloat16().requires_grad_() for x in (q, k, v)]
        layout = dict(key_index=key_index.cuda(), cu_seqlens_k=cu_k.cuda(), max_seqlen_k=max_k)
        out = varlen_attention(*low, cu.cuda(), max_q, causal=causal, backend=which, **layout)
        grads = torch.autograd.grad(out, low, grad_out.cuda().bfloat16())
        return [t.double().cpu() for t in (out, *grads)]

    for name, got, base, exp in zip(["out", "dq", "dk", "dv"], run(backend), run("sdpa"), expected):
        err, base_err = (got - exp).abs().max(), (base - exp).abs().max()
        assert err <= 2 * base_err + 1e-3, f"{backend} {name}: {err} vs sdpa {base_err}"
