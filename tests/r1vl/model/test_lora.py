"""LoRA (r1vl.model.lora, through peft): what is adapted, the reference as the adapters off, the
merged weights against peft's own merge, and the training step's log-probs and gradients
against the merged model's."""
import copy

import pytest
import torch
from tiny_qwen_vl import FAMILIES, grpo_batch, tiny_model

from r1vl.config import make_config
from r1vl.model import lora
from r1vl.model.activation_checkpointing import enable_activation_checkpointing
from r1vl.model.attention import use_varlen_attention
from r1vl.update.engine import PlainEngine, UpdateSettings
from r1vl.update.losses import completion_logprobs, policy_loss
from r1vl.update.packing import pack

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _adapted(family: str, seed: int = 0, **options):
    """A tiny model with LoRA adapters whose B is random (fresh ones are zero: no difference
    to test), and the options."""
    cfg = make_config(lora_rank=4, lora_alpha=8.0, **options).policy
    model = tiny_model(family, seed=seed)
    lora.add_adapters(model, cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model, cfg


def _merged_model(model, family: str) -> torch.nn.Module:
    """A plain model of the family holding `model`'s merged weights (no peft in it)."""
    plain = tiny_model(family)
    plain.load_state_dict(lora.merged_state_dict(model))  # strict: the plain model's names, every one
    return plain


# ------------------------------------------------------------------------------ options and targets


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_are_the_decoder_projections_only(family):
    model = tiny_model(family)
    names = lora.target_names(model, make_config(lora_rank=4).policy)
    assert len(names) == 2 * len(PROJECTIONS)  # 2 decoder layers
    assert all(".language_model.layers." in n and n.split(".")[-1] in PROJECTIONS for n in names)
    with_vision = lora.target_names(model, make_config(lora_rank=4, lora_vision=True, freeze_vision_tower=False).policy)
    vision = [n for n in with_vision if ".visual." in n]
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".visual." in n]
    assert vision == linears and len(vision) > 0  # blocks and merger(s), every one


def test_adapters_train_alone():
    model, _ = _adapted("qwen2_vl")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


@pytest.mark.parametrize("options,message", [
    (dict(lora_rank=-1), "--lora_rank"),
    (dict(lora_rank=4, lora_dropout=1.5), "--lora_dropout"),
    (dict(lora_rank=4, lora_alpha=-1.0), "--lora_alpha"),
    (dict(lora_rank=4, lora_target_modules="q_proj,,v_proj"), "--lora_target_modules"),
    (dict(lora_rank=4, lora_target_modules="q_proj,lm_head", lora_dropout=0.1), "--lora_dropout"),
    (dict(lora_rank=4, lora_vision=True), "--freeze_vision_tower"),  # the demo freezes the tower
    (dict(lora_rank=4, lora_target_modules="q_proj,qkv"), "--lora_target_modules.*qkv"),
])
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        make_config(**options)


def test_a_module_the_model_lacks_is_named():
    with pytest.raises(ValueError, match="qkv_proj"):
        lora.target_names(tiny_model("qwen2_vl"), make_config(lora_rank=4, lora_target_modules="q_proj,qkv_proj").policy)


# ------------------------------------------------------------------------------ merged weights


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_weights_equal_peft_merge_and_unload(family):
    model, _ = _adapted(family, lora_target_modules=",".join(PROJECTIONS) + ",lm_head")
    ours = lora.merged_state_dict(model)
    peft_merged = copy.deepcopy(lora.peft_model_of(model)).merge_and_unload().state_dict()
    assert set(ours) == set(peft_merged)
    for name in ours:
        assert torch.equal(ours[name], peft_merged[name]), name
    assert not torch.equal(ours["lm_head.weight"], tiny_model(family).lm_head.weight)


def test_reference_is_the_model_with_adapters_off():
    family = "qwen2_vl"
    base = tiny_model(family)
    model, _ = _adapted(family)
    use_varlen_attention(base)
    use_varlen_attention(model)
    packed = pack(grpo_batch(seed=3, G=2), model)
    engine = PlainEngine(model, UpdateSettings(lr=1e-3, total_steps=1), _world())
    reference = engine.reference()
    assert reference.engine is engine  # no copy of the model
    expected = completion_logprobs(base, packed, 1.2, "torch")
    torch.testing.assert_close(reference.forward(completion_logprobs, packed, 1.2, "torch"), expected,
                               rtol=0, atol=0)
    adapted = completion_logprobs(model, packed, 1.2, "torch")
    assert (adapted - expected).abs().max() > 1e-3  # the adapters do change the policy
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # back on afterwards


# ------------------------------------------------------------------------------ the training step


@pytest.mark.parametrize("family,share_prompts,checkpointing,lm_head", [
    ("qwen2_vl", False, False, False), ("qwen2_vl", True, True, True),
    ("qwen2_5_vl", True, False, False), ("qwen3_vl", True, True, False)])
def test_lora_logprobs_and_gradients_equal_the_merged_models(family, share_prompts, checkpointing, lm_head):
    """The GRPO loss of the adapted model equals that of a plain model holding the merged
    weights, and each adapter's gradient is the merged weight's gradient pulled back through
    W = W0 + s B A: dA = s B^T dW, dB = s dW A^T (shared-prompt packing, activation
    checkpointing and an adapted lm_head, which the fused loss reads merged, included)."""
    targets = ",".join(PROJECTIONS) + (",lm_head" if lm_head else "")
    model, _ = _adapted(family, lora_target_modules=targets)
    merged = _merged_model(model, family)
    for m in (model, merged):
        use_varlen_attention(m)
        if checkpointing:
            enable_activation_checkpointing(m)
        m.train()
    samples = grpo_batch(seed=5, G=3, family=family)
    advantages = torch.randn(len(samples), generator=torch.Generator().manual_seed(7))
    packed = pack(samples, model, share_prompts=share_prompts)
    base = tiny_model(family)
    use_varlen_attention(base)
    ref = completion_logprobs(base, packed, 1.0, "torch")
    options = dict(impl="torch", temperature=1.0, beta=0.04, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo",
                   max_completion_length=16, num_items_in_batch=packed.target_ids.numel())
    out = policy_loss(model, packed, advantages, None, ref, **options)
    expected = policy_loss(merged, packed, advantages, None, ref, **options)
    torch.testing.assert_close(out.logp, expected.logp, rtol=0, atol=2e-5)
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=2e-6)
    out.loss.backward()
    expected.loss.backward()
    merged_params = dict(merged.named_parameters())
    checked = 0
    for name, module in model.named_modules():
        if not lora.is_lora_layer(module):
            continue
        A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
        s = module.scaling["default"]
        dW = merged_params[f"{name}.weight"].grad
        torch.testing.assert_close(A.grad, s * B.detach().t() @ dW, rtol=1e-3, atol=1e-5, msg=f"{name} A")
        torch.testing.assert_close(B.grad, s * dW @ A.detach().t(), rtol=1e-3, atol=1e-5, msg=f"{name} B")
        checked += 1
    assert checked == 2 * len(PROJECTIONS) + lm_head


def _world():
    from r1vl import distributed

    return distributed.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
