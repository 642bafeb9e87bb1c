"""varlen attention against a float64 per-sequence softmax reference; its transformers
registration, backend choice and refusals."""
import logging

import pytest
import torch
import torch.nn.functional as F
from tiny_qwen_vl import FAMILIES, IMAGE, make_sequence, tiny_model
from transformers import AttentionInterface

from r1vl.model.attention import (
    BACKENDS,
    cu_seqlens_from_positions,
    implementation_name,
    pick_backend,
    sdpa_masked,
    use_varlen_attention,
    varlen_attention,
)
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


@pytest.mark.parametrize("family", FAMILIES)
def test_both_towers_run_through_the_registered_backend(family, monkeypatch):
    """On the pinned transformers, the switch takes in the language model and the vision
    tower alike: every attention layer of both calls r1vl's function (the tower once per
    image, its segment non-causal), and the packed forward equals transformers' own sdpa."""
    gen = torch.Generator().manual_seed(9)
    sequences = [make_sequence(gen, [(1, 4, 6)], 3, family=family), make_sequence(gen, [(1, 6, 4)], 2, family=family)]
    reference = tiny_model(family, seed=9)
    model = tiny_model(family, seed=9)
    packed = pack(sequences, model)
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
    assert len(text_calls) == text_layers and all(c[1] == len(sequences) for c in text_calls)
    # One segment a call (an image, or a window of one under Qwen2.5-VL's windowed layers),
    # every patch once per layer.
    assert all(c[1] == 1 for c in vision_calls)
    assert sum(c[2] for c in vision_calls) == vision_layers * sum(patches)
    if family != "qwen2_5_vl":  # no windows: one call per image per layer
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
    sequences = [make_sequence(gen, [(1, 4, 10)], 3), make_sequence(gen, [], 4), make_sequence(gen, [(1, 6, 4)], 2)]
    packed = pack(sequences, model)
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
        out = sdpa_masked(q, k.index_select(0, key_index), v.index_select(0, key_index), cu, cu_k, causal, 0.4, 0.0)
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
    torch.testing.assert_close(sdpa_masked(q, k, v, cu, cu, True, None, 0.0), per_segment, atol=1e-6, rtol=1e-6)


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


# --------------------------------------------------------------------------------------------
# The GPU backends on CPU: strict stand-ins with each supported version's real signature,
# injected where the code imports them; only the device check (runs_gpu_kernels) is swapped
# --------------------------------------------------------------------------------------------


def _checked_packed_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, gqa):
    """What the real kernels require, asserted; then bottom-right causal attention per
    segment with sdpa in fp32, as the kernels align it (the i-th of Lq queries sees the first
    Lk - Lq + i + 1 keys), returned in q's dtype."""
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        assert cu.dtype == torch.int32 and cu.dim() == 1 and cu.is_contiguous(), f"{name}: {cu.dtype}"
    assert type(max_q) is int and type(max_k) is int, (type(max_q), type(max_k))
    lq, lk = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
    assert max_q >= max(lq) and max_k >= max(lk)
    for t in (q, k, v):
        assert t.dim() == 3 and t.stride(-1) == 1, "last dimension must be contiguous"
        assert t.dtype in (torch.float16, torch.bfloat16) and t.dtype == q.dtype
    if k.shape[1] != q.shape[1]:
        assert gqa and q.shape[1] % k.shape[1] == 0, f"{q.shape[1]} query heads, {k.shape[1]} K/V heads"
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
    out = []
    for q0, q1, k0, k1 in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        qs, ks, vs = (t[a:b].float().transpose(0, 1) for t, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        mask = None
        if causal:
            mask = torch.arange(k1 - k0)[None, :] <= torch.arange(q1 - q0)[:, None] + (k1 - k0) - (q1 - q0)
        out.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale).transpose(0, 1))
    return torch.cat(out).to(q.dtype)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn 2.8's signature."""
    assert dropout_p == 0.0 and window_size == (-1, -1) and softcap == 0.0 and alibi_slopes is None
    return _checked_packed_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                     softmax_scale, gqa=True)


def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.9 / 2.10's signature: causal top-level flag, no scale, no GQA."""
    assert return_aux is None
    return _checked_packed_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, None, gqa=False)


def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):
    """torch 2.11's signature: window_size and scale, no enable_gqa."""
    assert return_aux is None and window_size in ((-1, -1), (-1, 0))
    return _checked_packed_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size == (-1, 0),
                                     scale, gqa=False)


def varlen_attn_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch 2.13's signature."""
    assert return_aux is None and seqused_k is None and block_table is None
    assert window_size in ((-1, -1), (-1, 0))
    return _checked_packed_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size == (-1, 0),
                                     scale, gqa=enable_gqa)


STAND_INS = {
    "flash_attn 2.8": ("flash_attn", flash_attn_varlen_func),
    "varlen_attn 2.10": ("varlen_attn", varlen_attn_2_10),
    "varlen_attn 2.11": ("varlen_attn", varlen_attn_2_11),
    "varlen_attn 2.13": ("varlen_attn", varlen_attn_2_13),
}


def _inject(monkeypatch, version):
    """Put the stand-in where varlen_attention imports it; let the GPU backends run on CPU."""
    import importlib.machinery
    import sys
    import types

    import torch.nn.attention.varlen as torch_varlen

    import r1vl.model.attention as attention

    backend, fn = STAND_INS[version]
    if backend == "flash_attn":
        module = types.ModuleType("flash_attn")
        module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
        module.flash_attn_varlen_func = fn
        monkeypatch.setitem(sys.modules, "flash_attn", module)
    else:
        monkeypatch.setattr(torch_varlen, "varlen_attn", fn)
    monkeypatch.setattr(attention, "runs_gpu_kernels", lambda device: True)
    attention.probe.cache_clear()
    return backend


@pytest.fixture(autouse=True)
def _fresh_probes():
    import r1vl.model.attention as attention

    attention.probe.cache_clear()
    yield
    attention.probe.cache_clear()


def _bf16_logprobs_and_grads(model, packed):
    model.zero_grad(set_to_none=True)
    hidden = completion_hidden(model, packed)
    logp = torch.log_softmax(model.lm_head(hidden).float(), -1).gather(1, packed.target_ids[:, None])[:, 0]
    weights = torch.randn(logp.shape, generator=torch.Generator().manual_seed(1))
    (weights * logp).sum().backward()
    return logp.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("version", list(STAND_INS))
@pytest.mark.parametrize("layout", ["plain", "shared", "split"])
def test_gpu_backend_stand_ins_match_sdpa_through_the_model(version, layout, monkeypatch):
    """Log-probs and every parameter's gradient (the vision tower's included) through a bf16
    tiny Qwen2-VL with the stand-in backend, against the same model on sdpa: plain packing,
    shared prompts, and a group split in two parts (each its own [prompt, completions])."""
    import copy

    from tiny_qwen_vl import make_group

    gen = torch.Generator().manual_seed(31)
    sequences = make_group(gen, [(1, 4, 6)], [3, 1, 5]) + make_group(gen, [], [2, 4])
    reference = tiny_model("qwen2_vl", seed=31).to(torch.bfloat16)
    model = copy.deepcopy(reference)
    backend = _inject(monkeypatch, version)
    assert use_varlen_attention(model, backend) == backend
    use_varlen_attention(reference, "sdpa")
    parts = {"plain": [sequences], "shared": [sequences], "split": [sequences[:2], sequences[2:]]}[layout]
    for part in parts:
        packed = pack(part, model, share_prompts=layout != "plain")
        logp, grads = _bf16_logprobs_and_grads(model, packed)
        logp_ref, grads_ref = _bf16_logprobs_and_grads(reference, packed)
        torch.testing.assert_close(logp, logp_ref, atol=3e-2, rtol=0)
        assert grads.keys() == grads_ref.keys() and any("visual" in n for n in grads)
        for name, g in grads.items():
            ref = grads_ref[name]
            assert (g - ref).norm() <= 0.05 * ref.norm() + 1e-6, f"{name}: {(g - ref).norm()} vs {ref.norm()}"


@pytest.mark.parametrize("version", list(STAND_INS))
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_backend_stand_ins_shared_prefix_gqa(version, causal, monkeypatch):
    """varlen_attention itself on the shared-prompt layout with grouped-query heads (6 query,
    2 K/V) and a scale other than D**-0.5, forward and backward against the float64
    reference: every version's keywords (GQA by expansion where enable_gqa is missing,
    scale folded into the queries where scale is)."""
    backend = _inject(monkeypatch, version)
    gen = torch.Generator().manual_seed(8)
    cu, key_index, cu_k, max_q, max_k = shared_layout(SHARED_GROUPS)
    T, D = int(cu[-1]), 16
    q, k, v = (torch.randn(T, h, D, generator=gen).bfloat16().requires_grad_() for h in (6, 2, 2))
    out = varlen_attention(q, k, v, cu, max_q, causal=causal, scale=0.4, backend=backend, key_index=key_index,
                           cu_seqlens_k=cu_k, max_seqlen_k=max_k)
    ref = reference_shared_attention(q, k, v, cu, key_index, cu_k, causal, 0.4)
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)
    grad_out = torch.randn(T, 6, D, generator=gen)
    got = torch.autograd.grad(out, (q, k, v), grad_out.bfloat16())
    expected = torch.autograd.grad(ref, (q, k, v), grad_out.double())
    for g, e in zip(got, expected):
        assert (g.double() - e).norm() <= 0.02 * e.norm()


def test_a_found_but_broken_flash_attn_is_not_picked(monkeypatch):
    """A flash-attn that is found (its spec exists) but fails at its first call, as a wheel
    built for another torch does: the probe call fails, varlen_attn is picked instead, and
    the probe runs once per (backend, device, dtype)."""
    import importlib.machinery
    import sys
    import types

    import r1vl.model.attention as attention

    _inject(monkeypatch, "varlen_attn 2.13")
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("flash_attn_2_cuda: undefined symbol")

    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.flash_attn_varlen_func = broken
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    assert attention.pick_backend(torch.device("cpu"), torch.bfloat16) == "varlen_attn"
    assert attention.pick_backend(torch.device("cpu"), torch.bfloat16) == "varlen_attn"
    assert len(calls) == 1
    assert "undefined symbol" in attention.probe("flash_attn", torch.device("cpu"), torch.bfloat16)
    with pytest.raises(RuntimeError, match="'flash_attn' does not run here"):
        use_varlen_attention(tiny_model("qwen2_vl").to(torch.bfloat16), "flash_attn")


def test_sdpa_off_cpu_never_builds_a_packed_mask(monkeypatch):
    """The sdpa backend on a device other than the CPU (meta tensors stand for a GPU's; the
    boundaries on the host) calls sdpa once per segment: no call sees more than one
    segment's queries and keys, so no (heads, T, T) scores."""
    import r1vl.model.attention as attention

    lengths = [5, 1, 9, 3]
    T = sum(lengths)
    seen = []

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append((q.shape[-2], k.shape[-2]))
        return torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    q, k, v = (torch.empty(T, h, 8, device="meta") for h in (4, 2, 2))
    out = varlen_attention(q, k, v, _cu(lengths), max(lengths), causal=True, backend="sdpa")
    assert out.shape == (T, 4, 8) and seen
    assert max(lq * lk for lq, lk in seen) <= max(lengths) ** 2, seen


def test_masked_sdpa_is_refused_for_a_cuda_model():
    """sdpa_masked's (heads, T, T_k) scores are quadratic in the packed length on CUDA (the mask
    with GQA runs only on the math kernel): refused there with the alternatives named, allowed
    on a CPU. The check reads only the device, so no GPU is needed to run it."""
    from r1vl.model.attention import check_backend

    with pytest.raises(ValueError, match="'sdpa_masked' takes memory quadratic in the packed length on CUDA"):
        check_backend("sdpa_masked", torch.device("cuda"), torch.bfloat16)
    check_backend("sdpa_masked", torch.device("cpu"), torch.float32)
    check_backend("sdpa", torch.device("cuda"), torch.float32)  # per segment: linear in T
