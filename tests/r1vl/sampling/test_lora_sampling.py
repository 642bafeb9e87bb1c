"""The sampler on a LoRA policy: it decodes the merged policy (its joined weights merged from the
current adapters every rollout), exactly as the sampler on a plain model holding the merged weights."""
import pytest
import torch
from tiny_qwen_vl import make_sequence, tiny_model

from r1vl.config import make_config
from r1vl.data.prompts import Prompt
from r1vl.model import lora
from r1vl.sampling.generate import generate


def _prompts(family):
    gen = torch.Generator().manual_seed(1)
    samples = [make_sequence(gen, [grid], 1, text_lens=lens, family=family)
               for grid, lens in zip([(1, 4, 6), (1, 8, 8)], [[2, 5], [7, 1]])]
    return [Prompt(torch.as_tensor(s.prompt_ids), s.pixel_values, s.image_grid_thw, None) for s in samples]


def _adapted(family, targets):
    model = tiny_model(family)
    lora.add_adapters(model, make_config(lora_rank=4, lora_target_modules=targets).policy)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    return model


@pytest.mark.parametrize("family,targets", [
    ("qwen2_vl", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
    ("qwen2_5_vl", "q_proj,v_proj,down_proj,lm_head"),
    ("qwen3_vl", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")])
def test_sampler_with_adapters_equals_the_sampler_on_merged_weights(family, targets):
    model = _adapted(family, targets)
    merged = tiny_model(family)
    merged.load_state_dict(lora.merged_state_dict(model))
    prompts = _prompts(family)
    runs = [generate(m, prompts, 3, 16, [5, 9, 17], temperature=1.0, generator=torch.Generator().manual_seed(2))
            for m in (model, merged)]
    assert [ids.tolist() for ids in runs[0].ids] == [ids.tolist() for ids in runs[1].ids]
    for a, b in zip(runs[0].logprobs, runs[1].logprobs):
        assert torch.equal(a, b)
    # The adapters matter, are back on afterwards, and the base weights are the base's again.
    plain = generate(tiny_model(family), prompts, 3, 16, [5, 9, 17], temperature=1.0,
                     generator=torch.Generator().manual_seed(2))
    assert [ids.tolist() for ids in plain.ids] != [ids.tolist() for ids in runs[0].ids]
    assert lora.adapters_enabled(model)
    base = dict(tiny_model(family).named_parameters())
    for name, module in model.named_modules():
        if lora.is_lora_layer(module):
            assert torch.equal(module.get_base_layer().weight, base[f"{name}.weight"]), name
