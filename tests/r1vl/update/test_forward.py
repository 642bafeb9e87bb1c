"""completion_hidden on a packed batch against the plain padded transformers forward.

The batch mixes images of different sizes (square, wide, tall, several windows for
Qwen2.5-VL), several images in one prompt, text-only prompts, GRPO siblings sharing one image,
and completions from 1 token up. The reference is a right-padded batch through the model's
own forward with sdpa attention, every image encoded for every sequence that shows it.
"""
import copy
import functools

import pytest
import torch
from tiny_qwen_vl import FAMILIES, IMAGE, grpo_batch, make_sequence, tiny_model

from r1vl.model.attention import use_varlen_attention
from r1vl.model.policy import vision_tower
from r1vl.update.forward import completion_hidden
from r1vl.update.packing import pack


def rollout_batch(seed: int, family: str = "qwen2_vl"):
    gen = torch.Generator().manual_seed(seed)
    sequence = functools.partial(make_sequence, gen, family=family)
    first = sequence([(1, 4, 6)], completion_len=1)
    sibling = sequence([(1, 4, 6)], completion_len=7, pixel_values=first.pixel_values)
    sibling.prompt_ids = first.prompt_ids  # same prompt, same image, another completion
    return [
        first,
        sequence([], completion_len=5),
        sequence([(1, 4, 4), (1, 10, 14)], completion_len=9, text_lens=[3, 1, 6]),
        sibling,
        sequence([(1, 12, 6)], completion_len=2, text_lens=[1, 1]),
        sequence([], completion_len=1, text_lens=[1]),
        sequence([(1, 2, 2)], completion_len=23),
    ]


def padded_reference_logprobs(model, sequences):
    """Per-token completion log-probs of each sequence from one right-padded HF forward."""
    lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in sequences]
    ids = torch.zeros(len(sequences), max(lengths), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : lengths[i]] = torch.cat([torch.as_tensor(s.prompt_ids), torch.as_tensor(s.completion_ids)])
        mask[i, : lengths[i]] = 1
    with_images = [s for s in sequences if s.pixel_values is not None]
    logits = model(
        input_ids=ids, attention_mask=mask, use_cache=False,
        pixel_values=torch.cat([s.pixel_values for s in with_images]) if with_images else None,
        image_grid_thw=torch.cat([s.image_grid_thw for s in with_images]) if with_images else None,
        mm_token_type_ids=(ids == IMAGE).int(),
    ).logits
    out = []
    for i, s in enumerate(sequences):
        p, c = len(s.prompt_ids), len(s.completion_ids)
        logp = torch.log_softmax(logits[i, p - 1 : p + c - 1].float(), dim=-1)
        out.append(logp.gather(1, torch.as_tensor(s.completion_ids)[:, None])[:, 0])
    return out


def packed_logprobs(model, packed):
    hidden = completion_hidden(model, packed)
    logp = torch.log_softmax(model.lm_head(hidden).float(), dim=-1)
    return logp.gather(1, packed.target_ids[:, None])[:, 0]


def advantage_weighted(logprobs, advantages, sequences):
    """sum over tokens of A(sequence) * logp(token): the policy-gradient part of GRPO's loss."""
    per_token = torch.repeat_interleave(advantages, torch.tensor([len(s.completion_ids) for s in sequences]))
    return (per_token * logprobs).sum()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_packed_matches_padded_logprobs_and_gradients(family, seed):
    reference = tiny_model(family, seed=seed)
    model = copy.deepcopy(reference)
    assert use_varlen_attention(model) == "sdpa"
    sequences = rollout_batch(seed, family)
    packed = pack(sequences, model)
    advantages = torch.randn(len(sequences), generator=torch.Generator().manual_seed(seed))

    logp = packed_logprobs(model, packed)
    ref = padded_reference_logprobs(reference, sequences)
    assert logp.shape == (sum(len(s.completion_ids) for s in sequences),)
    cu = packed.completion_cu_seqlens.tolist()
    for s, r in enumerate(ref):
        torch.testing.assert_close(logp[cu[s] : cu[s + 1]], r, atol=1e-5, rtol=0)

    advantage_weighted(logp, advantages, sequences).backward()
    advantage_weighted(torch.cat(ref), advantages, sequences).backward()
    ref_grads = dict(reference.named_parameters())
    checked = 0
    for name, param in model.named_parameters():
        expected = ref_grads[name].grad
        if expected is None:
            assert param.grad is None, name
            continue
        torch.testing.assert_close(param.grad, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        checked += 1
    # The vision tower and every text layer got gradients through the packed path.
    assert any("visual" in n for n, p in model.named_parameters() if p.grad is not None)
    assert checked == len(ref_grads)


def test_text_only_batch():
    reference = tiny_model("qwen2_vl", seed=3)
    model = copy.deepcopy(reference)
    use_varlen_attention(model)
    gen = torch.Generator().manual_seed(3)
    sequences = [make_sequence(gen, [], n, text_lens=[m]) for n, m in [(1, 1), (4, 9), (11, 2)]]
    packed = pack(sequences, model)
    assert packed.pixel_values is None and packed.image_token_source is None
    expected = torch.cat(padded_reference_logprobs(reference, sequences))
    torch.testing.assert_close(packed_logprobs(model, packed), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_tower_runs_once_on_distinct_images_and_lm_head_never(family):
    model = tiny_model(family)
    use_varlen_attention(model)
    sequences = rollout_batch(4, family)  # 7 sequences, 6 images, 5 distinct
    packed = pack(sequences, model)
    tower_calls, head_calls = [], []

    def count(module, args, kwargs):
        tower_calls.append((args[0].shape[0], kwargs["grid_thw"].tolist()))  # (patch rows, grids)

    hooks = [
        model.model.visual.register_forward_pre_hook(count, with_kwargs=True),
        model.lm_head.register_forward_pre_hook(lambda module, args: head_calls.append(args[0].shape)),
    ]
    try:
        hidden = completion_hidden(model, packed)
    finally:
        for hook in hooks:
            hook.remove()
    distinct = [[1, 4, 6], [1, 4, 4], [1, 10, 14], [1, 12, 6], [1, 2, 2]]
    assert tower_calls == [(sum(t * h * w for t, h, w in distinct), distinct)]
    assert head_calls == [] and hidden.shape == (packed.target_ids.numel(), 64)


def test_sdpa_model_without_varlen_registration_gives_the_same_hidden_states():
    """completion_hidden does not depend on r1vl's attention: under transformers' own sdpa the
    restarting positions make it build the block-diagonal mask itself."""
    model = tiny_model("qwen2_5_vl", seed=8)
    packed = pack(rollout_batch(8), model)
    plain = completion_hidden(model, packed)
    use_varlen_attention(model)
    torch.testing.assert_close(completion_hidden(model, packed), plain, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# The shared-prompt layout (pack(..., share_prompts=True)) against the padded forward and the
# unshared packing
# --------------------------------------------------------------------------------------------


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("G", [1, 3, 8])
def test_shared_prompts_match_padded_and_unshared_logprobs_and_gradients(family, G):
    reference = tiny_model(family, seed=G)
    shared_model, unshared_model = copy.deepcopy(reference), copy.deepcopy(reference)
    use_varlen_attention(shared_model)
    use_varlen_attention(unshared_model)
    sequences = grpo_batch(G, G, family)
    shared = pack(sequences, shared_model, share_prompts=True)
    unshared = pack(sequences, unshared_model)
    assert shared.shares_prompts == (G > 1)
    prompt_rows = sum(len(sequences[g * G].prompt_ids) for g in range(3))
    assert shared.num_tokens == prompt_rows + shared.target_ids.numel()
    advantages = torch.randn(len(sequences), generator=torch.Generator().manual_seed(G))

    logp = packed_logprobs(shared_model, shared)
    ref = padded_reference_logprobs(reference, sequences)
    cu = shared.completion_cu_seqlens.tolist()
    for s, r in enumerate(ref):
        torch.testing.assert_close(logp[cu[s] : cu[s + 1]], r, atol=1e-5, rtol=0)
    logp_unshared = packed_logprobs(unshared_model, unshared)
    torch.testing.assert_close(logp, logp_unshared, atol=1e-6, rtol=0)

    advantage_weighted(logp, advantages, sequences).backward()
    advantage_weighted(torch.cat(ref), advantages, sequences).backward()
    advantage_weighted(logp_unshared, advantages, sequences).backward()
    padded_grads, unshared_grads = _grads(reference), _grads(unshared_model)
    for name, param in shared_model.named_parameters():
        assert param.grad is not None, name  # every parameter, the vision tower's included
        torch.testing.assert_close(param.grad, padded_grads[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(param.grad, unshared_grads[name], atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


def test_shared_prompts_for_every_group_size_from_1_to_8():
    """Log-probs of G = 1..8 in one packed row each, against the unshared packing (the
    gradients: the test above, G = 1, 3 and 8)."""
    model = tiny_model("qwen2_vl", seed=11)
    use_varlen_attention(model)
    with torch.no_grad():
        for G in range(1, 9):
            sequences = grpo_batch(100 + G, G)[G:]  # the two-image and the text-only prompt
            torch.testing.assert_close(packed_logprobs(model, pack(sequences, model, share_prompts=True)),
                                       packed_logprobs(model, pack(sequences, model)), atol=1e-6, rtol=0)


def test_shared_batch_refuses_a_model_without_varlen_attention():
    model = tiny_model("qwen2_vl")
    packed = pack(grpo_batch(0, 2), model, share_prompts=True)
    with pytest.raises(ValueError, match="needs r1vl's varlen attention"):
        completion_hidden(model, packed)


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_tower_is_the_visual_module_of_either_wrapper(family):
    """ForConditionalGeneration and its base model give the same module, and that module
    holds exactly the parameters named under `visual` (patch embedding, blocks, merger):
    what --freeze_vision_tower freezes and nothing of the language model."""
    model = tiny_model(family)
    tower = vision_tower(model)
    assert tower is vision_tower(model.model)
    assert type(tower).__name__.endswith(("VisionTransformerPretrainedModel", "VisionModel"))
    visual = {n for n, _ in model.named_parameters() if "visual" in n.split(".")}
    owned = {id(p) for p in tower.parameters()}
    assert {n for n, p in model.named_parameters() if id(p) in owned} == visual
    parts = {n.split(".")[2] for n in visual}
    assert parts >= {"patch_embed", "blocks", "merger"}
    assert ("deepstack_merger_list" in parts) == (family == "qwen3_vl")
    assert len(visual) < len(list(model.parameters()))  # the language model and lm_head stay out


@pytest.mark.parametrize("shift", [0, 1])
def test_deepstack_features_reach_their_image_tokens(shift, monkeypatch):
    """Qwen3-VL adds each DeepStack layer's features to the first decoder layers' hidden states
    at the image tokens. Shifted by one image-token row, the packed log-probs must leave the
    padded reference: the comparison above would catch a misplaced DeepStack feature."""
    import r1vl.update.forward as forward

    reference = tiny_model("qwen3_vl", seed=2)
    model = copy.deepcopy(reference)
    use_varlen_attention(model)
    sequences = rollout_batch(2, "qwen3_vl")
    place = forward.image_token_features

    def shifted(vision, token_source):
        out = place(vision, token_source)
        out.deepstack_features = [(layer[0].roll(shift, 0),) for layer in out.deepstack_features]
        return out

    monkeypatch.setattr(forward, "image_token_features", shifted)
    with torch.no_grad():
        error = (packed_logprobs(model, pack(sequences, model)) - torch.cat(padded_reference_logprobs(reference, sequences)))
    if shift == 0:
        assert error.abs().max() < 1e-5
    else:
        assert error.abs().max() > 1e-2, "DeepStack features shifted by one token changed nothing"


def test_vision_tower_refuses_a_model_without_one():
    model = tiny_model("qwen2_vl")
    for other in (model.model.language_model, torch.nn.Linear(2, 2)):
        with pytest.raises(ValueError, match=f"{type(other).__name__} has no vision tower"):
            vision_tower(other)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn", "varlen_attn"])
def test_gpu_backend_on_shared_prompts_matches_fp32(backend):
    """A bf16 model on the GPU through a varlen kernel, shared-prompt layout: log-probs and
    gradients within 2x the error of the masked sdpa form in bf16, against fp32 on the CPU."""
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
    reference = tiny_model("qwen2_5_vl", seed=6)
    sequences = grpo_batch(6, 4)
    advantages = torch.randn(len(sequences), generator=torch.Generator().manual_seed(6))
    use_varlen_attention(reference)
    logp_ref = packed_logprobs(reference, pack(sequences, reference))
    advantage_weighted(logp_ref, advantages, sequences).backward()

    def run(which):
        model = copy.deepcopy(reference).cuda().bfloat16()
        model.zero_grad(set_to_none=True)
        use_varlen_attention(model, which)
        logp = packed_logprobs(model, pack(sequences, model, share_prompts=True).to("cuda"))
        advantage_weighted(logp, advantages.cuda(), sequences).backward()
        return logp.double().cpu(), {n: p.grad.double().cpu() for n, p in model.named_parameters()}

    (logp, grads), (logp_sdpa, grads_sdpa) = run(backend), run("sdpa")
    err, base = (logp - logp_ref).abs().max(), (logp_sdpa - logp_ref).abs().max()
    assert err <= 2 * base + 1e-2, f"log-probs: {err} vs sdpa {base}"
    for name, param in reference.named_parameters():
        err = (grads[name] - param.grad).abs().max()
        base = (grads_sdpa[name] - param.grad).abs().max()
        assert err <= 2 * base + 1e-2 * param.grad.abs().max(), f"{name}: {err} vs sdpa {base}"
