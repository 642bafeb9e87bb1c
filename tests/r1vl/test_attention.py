"""varlen attention against a float64 per-sequence softmax reference; its transformers
registration, backend choice and refusals."""
import logging

import pytest
import torch
from tiny_qwen_vl import IMAGE, make_sample, tiny_model
from transformers import AttentionInterface

from r1vl.attention import (
    BACKENDS,
    cu_seqlens_from_positions,
    implementation_name,
    pick_backend,
    use_varlen_attention,
    varlen_attention,
)
from r1vl.model import completion_hidden
from r1vl.packing import pack


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
def test_per_sequence_sdpa_matches_masked_sdpa(causal):
    """The opt-in "sdpa_per_sequence" backend (one unmasked call per sequence), with a
    zero-length sequence, forward and backward against the reference and the masked form."""
    gen = torch.Generator().manual_seed(12)
    lengths = [3, 0, 9, 1, 6]
    T, D = sum(lengths), 16
    q = torch.randn(T, 6, D, generator=gen, requires_grad=True)
    k = torch.randn(T, 2, D, generator=gen, requires_grad=True)
    v = torch.randn(T, 2, D, generator=gen, requires_grad=True)
    looped = varlen_attention(q, k, v, _cu(lengths), max(lengths), causal=causal, scale=0.25,
                              backend="sdpa_per_sequence")
    torch.testing.assert_close(looped.double(), reference_attention(q, k, v, lengths, causal, 0.25),
                               atol=1e-5, rtol=1e-5)
    grads_looped = torch.autograd.grad(looped.square().sum(), (q, k, v))
    masked = varlen_attention(q, k, v, _cu(lengths), max(lengths), causal=causal, scale=0.25, backend="sdpa")
    grads_masked = torch.autograd.grad(masked.square().sum(), (q, k, v))
    torch.testing.assert_close(looped, masked, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_looped, grads_masked):
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
    with caplog.at_level(logging.INFO, logger="r1vl.attention"):
        assert use_varlen_attention(model) == "sdpa"
    assert "backend sdpa" in caplog.text
    name = implementation_name("sdpa")
    assert name in AttentionInterface._global_mapping
    assert model.model.language_model.config._attn_implementation == name
    assert model.model.visual.config._attn_implementation == name
    assert pick_backend(torch.device("cpu"), torch.bfloat16) == "sdpa"
    assert pick_backend(torch.device("cuda"), torch.float32) == "sdpa"


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
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in ("sdpa", "sdpa_per_sequence")])
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
