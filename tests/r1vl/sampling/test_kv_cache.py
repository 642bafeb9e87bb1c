"""The rollout cache: shared-prefix attention equals one plain softmax over prompt + own keys;
compaction moves rows and prompts without touching what stays."""
import pytest
import torch

from r1vl.sampling.kv_cache import RolloutCache, shared_prefix_attention


def _plain_attention(query, prefix_k, prefix_v, lengths, slots, group, comp_k, comp_v, columns):
    """Row b: softmax over [its prompt's first lengths[p] keys ; its own first `columns` keys]."""
    out = []
    for b in range(query.shape[0]):
        p = int(slots[b]) // group
        k = torch.cat([prefix_k[p, :, :lengths[p]], comp_k[b, :, :columns]], dim=1)  # (Hkv, L, D)
        v = torch.cat([prefix_v[p, :, :lengths[p]], comp_v[b, :, :columns]], dim=1)
        weights = torch.softmax(0.3 * query[b] @ k.transpose(-1, -2), dim=-1)  # (Hkv, R, L), scale 0.3
        out.append(weights @ v)
    return torch.stack(out)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # plain ops; the CPU's fused kernel
def test_shared_prefix_attention_equals_plain_attention(masked, dtype):
    gen = torch.Generator().manual_seed(0)
    NP, G, Hkv, R, D, C = 3, 4, 2, 3, 8, 7
    lengths = [5, 9, 2]
    Lp = max(lengths)
    prefix_k = torch.randn(NP, Hkv, Lp, D, generator=gen, dtype=torch.float64)
    prefix_v = torch.randn(NP, Hkv, Lp, D, generator=gen, dtype=torch.float64)
    bias = torch.zeros(NP, Lp, dtype=torch.float64)
    for p, n in enumerate(lengths):
        prefix_k[p, :, n:] = 1e3  # padding holds garbage: the bias must hide it
        bias[p, n:] = float("-inf")
    slots = torch.tensor([0, 2, 3, 5, 9, 10, 11])  # uneven rows per prompt, prompt 1 one row
    B = slots.numel()
    query = torch.randn(B, Hkv, R, D, generator=gen, dtype=torch.float64)
    comp_k = torch.randn(B, Hkv, C, D, generator=gen, dtype=torch.float64)
    comp_v = torch.randn(B, Hkv, C, D, generator=gen, dtype=torch.float64)
    written = 4
    comp_bias = None
    if masked:  # a static-shape call: all C columns passed, those past `written` masked
        comp_k[:, :, written:] = 1e3
        comp_bias = torch.zeros(C, dtype=torch.float64).masked_fill_(torch.arange(C) >= written, float("-inf"))
        out = shared_prefix_attention(query.to(dtype), prefix_k.to(dtype), prefix_v.to(dtype), bias.to(dtype), slots,
                                      G, comp_k.to(dtype), comp_v.to(dtype), comp_bias.to(dtype), scale=0.3)
    else:
        out = shared_prefix_attention(query.to(dtype), prefix_k.to(dtype), prefix_v.to(dtype), bias.to(dtype), slots,
                                      G, comp_k[:, :, :written].to(dtype), comp_v[:, :, :written].to(dtype), scale=0.3)
    expected = _plain_attention(query, prefix_k, prefix_v, lengths, slots, G, comp_k, comp_v, written)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


def test_padding_rows_do_not_disturb_live_rows():
    gen = torch.Generator().manual_seed(1)
    NP, G, Hkv, R, D, C = 2, 2, 1, 2, 4, 3
    prefix_k, prefix_v = torch.randn(2, NP, Hkv, 5, D, generator=gen)
    bias = torch.zeros(NP, 5)
    comp_k, comp_v = torch.randn(2, 4, Hkv, C, D, generator=gen)
    query = torch.randn(4, Hkv, R, D, generator=gen)
    live = shared_prefix_attention(query[:2], prefix_k, prefix_v, bias, torch.tensor([1, 2]), G,
                                   comp_k[:2], comp_v[:2])
    # Two padding rows, both at place NP * G, with large queries.
    query[2:] = 1e4
    padded = shared_prefix_attention(query, prefix_k, prefix_v, bias, torch.tensor([1, 2, 4, 4]), G, comp_k, comp_v)
    torch.testing.assert_close(padded[:2], live, rtol=0, atol=0)


def test_allocate_holds_each_prompt_once():
    cache = RolloutCache.allocate([3, 5], 4, 6, num_layers=2, num_kv_heads=2, head_dim=8,
                                  dtype=torch.float32, device=torch.device("cpu"))
    assert cache.prefix_k.shape == (2, 2, 2, 5, 8)  # (L, prompts, Hkv, longest prompt, D): not x G
    assert cache.comp_k.shape == (2, 8, 2, 6, 8)
    assert torch.equal(torch.isinf(cache.prefix_bias), torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]).bool())
    assert cache.nbytes() == 4 * 2 * 2 * (2 * 2 * 5 * 8 + 8 * 2 * 6 * 8)  # fp32, K and V, 2 layers


def test_compaction_moves_rows_and_prompts():
    cache = RolloutCache.allocate([2, 3, 1], 2, 5, num_layers=2, num_kv_heads=1, head_dim=3,
                                  dtype=torch.float32, device=torch.device("cpu"))
    for t in (cache.prefix_k, cache.prefix_v, cache.comp_k, cache.comp_v):
        t.copy_(torch.randn(t.shape))
    comp_before, prefix_before, bias_before = cache.comp_k.clone(), cache.prefix_v.clone(), cache.prefix_bias.clone()
    cache.move_rows(torch.tensor([4, 5]), torch.tensor([0, 2]), columns=3)
    keep = torch.tensor([4, 1, 5, 3])
    assert torch.equal(cache.comp_k[:, :4, :, :3], comp_before[:, keep, :, :3])
    assert torch.equal(cache.comp_k[:, :, :, 3:], comp_before[:, :, :, 3:])  # columns not yet written: untouched
    cache.compact_prompts(torch.tensor([0, 2]))
    assert torch.equal(cache.prefix_v[:, :2], prefix_before[:, [0, 2]])
    assert torch.equal(cache.prefix_bias[:2], bias_before[[0, 2]])
