"""The packed prefill: the keys and values it caches, and its last-token logits, equal those of
the model's own forward (transformers, DynamicCache) for each prompt alone."""
import pytest
import torch
from tiny_qwen_vl import FAMILIES, make_sequence, tiny_model

import r1vl.sampling.decode
from r1vl.data.prompts import Prompt
from r1vl.sampling.decode import prefill, prompt_positions
from r1vl.sampling.kv_cache import RolloutCache


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_prefill_equals_each_prompts_own_forward(family):
    # Qwen3-VL: the keys pass k_norm, and DeepStack features join the first layers' outputs.
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(0)
    sequences = [make_sequence(gen, [grid], 1, text_lens=lens, family=family)
               for grid, lens in [((1, 4, 6), [3, 2]), ((1, 8, 8), [1, 6]), ((1, 4, 4), [5, 5])]]
    prompts = [Prompt(torch.as_tensor(s.prompt_ids), s.pixel_values, s.image_grid_thw, None) for s in sequences]
    lengths = [p.ids.numel() for p in prompts]
    text = model.config.text_config
    cache = RolloutCache.allocate(lengths, 2, 4, text.num_hidden_layers, text.num_key_value_heads,
                                  model.model.language_model.layers[0].self_attn.head_dim, torch.float32,
                                  torch.device("cpu"))
    with torch.no_grad():
        logits = prefill(model, prompts, cache, [prompt_positions(model, p)[0] for p in prompts])
        for p, prompt in enumerate(prompts):
            ids = prompt.ids[None]
            out = model(input_ids=ids, mm_token_type_ids=(ids == model.config.image_token_id).int(),
                        pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw, use_cache=True)
            torch.testing.assert_close(logits[p], out.logits[0, -1].float(), rtol=0, atol=1e-5)
            n = lengths[p]
            for layer in range(text.num_hidden_layers):
                torch.testing.assert_close(cache.prefix_k[layer, p, :, :n], out.past_key_values.layers[layer].keys[0],
                                           rtol=0, atol=1e-5)
                torch.testing.assert_close(cache.prefix_v[layer, p, :, :n],
                                           out.past_key_values.layers[layer].values[0], rtol=0, atol=1e-5)
            assert (cache.prefix_k[:, p, :, n:] == 0).all()  # padding untouched


def test_fused_rms_norm_is_the_models_norm_for_every_family():
    from r1vl.sampling.decode import fused_norm

    for family in FAMILIES:
        lm = tiny_model(family).model.language_model
        attn = lm.layers[0].self_attn
        norms = [lm.norm] + [getattr(attn, name) for name in ("q_norm", "k_norm") if hasattr(attn, name)]
        assert len(norms) == (3 if family == "qwen3_vl" else 1)
        for norm in norms:
            assert type(norm).__name__ in r1vl.sampling.decode._RMS_NORMS  # the fused form, not the module
            with torch.no_grad():
                norm.weight.copy_(torch.rand_like(norm.weight) + 0.5)
                x = torch.randn(5, 3, norm.weight.numel()) * 3
                torch.testing.assert_close(fused_norm(norm, x), norm(x), rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(fused_norm(norm.to(torch.bfloat16), x.bfloat16()), norm(x.bfloat16()))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])  # sectioned and interleaved M-RoPE
def test_text_rope_tables_equal_the_models_rotary_embedding(family):
    from r1vl.sampling.decode import rope_tables, text_rope_tables

    lm = tiny_model(family).model.language_model
    positions = torch.tensor([0, 7, 300, 4095])
    hidden = torch.zeros(4, 64)
    for got, expected in zip(text_rope_tables(lm, hidden, positions),
                             rope_tables(lm, hidden, positions.view(1, 1, -1).expand(3, 1, -1))):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_masked_column_bucket_gives_the_logits_of_the_columns_written():
    """The compiled step attends over a bucket of completion columns (a power of two) and
    masks those past the current one, which hold stale or unwritten values. At every step of
    a rollout its logits must equal those of the unmasked step over exactly the t + 1 columns
    written, with the columns past t filled with large junk first: masking the current column
    too, or one column too few, changes them. Both forms run eagerly here, through generate's
    own call of the compiled step (the compiled graph computes the same function)."""
    import inspect

    import r1vl.sampling.generate
    from r1vl.sampling.decode import decode_step
    from r1vl.sampling.generate import generate

    gen = torch.Generator().manual_seed(0)
    model = tiny_model("qwen2_vl", seed=1)
    prompts = []
    for n in (5, 9):
        sequence = make_sequence(gen, [(1, 4, 4)], completion_len=1, text_lens=[n, 3])
        prompts.append(Prompt(sequence.prompt_ids, sequence.pixel_values, sequence.image_grid_thw, None))
    signature = inspect.signature(decode_step)
    checked = []

    def step(*args):
        a = signature.bind(*args).arguments
        t, columns = int(a["column"]), a["columns"]
        assert a["masked"] and columns > t + 1 or t + 1 == columns
        for cache in (a["comp_k"], a["comp_v"]):  # junk where nothing valid is written yet
            cache[:, :, :, t + 1:].normal_(0, 100, generator=torch.Generator().manual_seed(t))
        masked = decode_step(*args)
        exact = dict(a, column=t, columns=t + 1, masked=False)
        expected = decode_step(**exact)
        assert torch.isfinite(masked).all(), t
        torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {t}: {m}")
        checked.append(t)
        return masked

    old = dict(r1vl.sampling.generate._Stepper._compiled)
    r1vl.sampling.generate._Stepper._compiled[("eager", "cpu")] = step
    try:
        generate(model, prompts, 2, 6, [], compile_step=True, compile_backend="eager",
                 generator=torch.Generator().manual_seed(0))
    finally:
        r1vl.sampling.generate._Stepper._compiled.clear()
        r1vl.sampling.generate._Stepper._compiled.update(old)
    assert checked == list(range(5))
