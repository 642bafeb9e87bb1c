"""FusedGRPOTrainer (r1vl_kernels.trl) against TRL's own GRPOTrainer._compute_loss, on tiny
random models (a Qwen2 text model, a Qwen2-VL and a Qwen3-VL with tied embeddings and
DeepStack, with an image) on CPU: from the same weights
and the same prepared batch, the same loss and the same gradient for every parameter, for
every supported loss type x importance-sampling level x beta x weight option; and a refusal,
naming the option, of everything the fused loss cannot give exactly.

TRL's loss is its own method called on the same trainer object (`GRPOTrainer._compute_loss`),
so both sides see the same attributes, inputs and model."""
import itertools
import subprocess
import sys
import types

import pytest
import torch

# A module-level skip, not a collection error, where trl / datasets are missing (the GPU
# machine's image has neither unless they are carried): the rest of the GPU suite still runs.
pytest.importorskip("datasets")
pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from r1vl.tiny import SPECIAL_TOKENS, build_tokenizer  # noqa: E402
from r1vl_kernels.trl import FusedGRPOTrainer, unsupported_options  # noqa: E402

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
OPTIONS = ("none", "vllm_token_is", "vllm_sequence_is", "entropy_mask", "off_policy_mask", "bias_correction_kl", "all")
B, P, T = 4, 9, 7                 # sequences (2 groups of 2), prompt and completion lengths
COMPLETION_LENS = [7, 3, 5, 1]


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tokenizer(["the quick brown fox jumps over 12 lazy dogs + 3 = 15"] * 4, vocab_size=300)
    tok.padding_side = "left"
    return tok


def make_trainer(model, tokenizer, tmp_path_factory, peft_config=None, **config):
    # Spread-out logits: at the default init every entropy is within rounding of log V, and
    # the entropy mask's quantile threshold would then select tokens by their rounding error.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=B,
                      num_generations=2, max_completion_length=T, report_to="none", use_cpu=True,
                      save_strategy="no", temperature=0.9, bf16=False, **config)
    trainer = FusedGRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                               args=args, train_dataset=Dataset.from_list([{"prompt": "fox"}] * B),
                               processing_class=tokenizer, peft_config=peft_config)
    trainer.current_gradient_accumulation_steps = 2  # set by Trainer.train; TRL's loss divides by it
    trainer.kernel_impl = "torch"  # the eager path; test_triton_kernels_match_trl runs the Triton one
    return trainer


@pytest.fixture(scope="module")
def text_trainer(tokenizer, tmp_path_factory):
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return make_trainer(Qwen2ForCausalLM(config), tokenizer, tmp_path_factory)


@pytest.fixture(scope="module")
def vl_trainer(tokenizer, tmp_path_factory):
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    return make_trainer(Qwen2VLForConditionalGeneration(config), tokenizer, tmp_path_factory)


@pytest.fixture(scope="module")
def qwen3_vl_trainer(tokenizer, tmp_path_factory):
    """Qwen3-VL as its small models are: lm_head tied to the embedding, q/k norms, a DeepStack
    merger feeding decoder layer 0, 16-pixel patches."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True},
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=16,
                  temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    return make_trainer(model, tokenizer, tmp_path_factory)


def make_batch(trainer, tokenizer, seed: int, vision: bool) -> dict:
    """A prepared batch as GRPOTrainer._generate_and_score_completions returns it: left-padded
    prompts (with one 4-token image each for Qwen2-VL), right-padded completions, old /
    reference / sampler log-probs near the current ones, vLLM importance ratios."""
    g = torch.Generator().manual_seed(seed)
    V = len(tokenizer)
    prompt_ids = torch.randint(len(SPECIAL_TOKENS), V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt_ids[1, :2] = tokenizer.pad_token_id
    completion_ids = torch.randint(len(SPECIAL_TOKENS), V, (B, T), generator=g)
    completion_mask = (torch.arange(T)[None] < torch.tensor(COMPLETION_LENS)[:, None]).long()
    completion_ids[completion_mask == 0] = tokenizer.pad_token_id
    batch = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                 completion_mask=completion_mask, advantages=torch.randn(B, generator=g),
                 num_items_in_batch=completion_mask.sum() * 2)
    if vision:
        image = [tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>",) + ("<|image_pad|>",) * 4
                 + ("<|vision_end|>",)]
        prompt_ids[:, P - len(image):] = torch.tensor(image)
        mm = torch.zeros(B, P + T, dtype=torch.int32)
        mm[:, P - len(image) + 1:P - 1] = 1
        patch = trainer.model.config.vision_config.patch_size
        batch.update(pixel_values=torch.randn(B * 16, 3 * 2 * patch * patch, generator=g),
                     image_grid_thw=torch.tensor([[1, 4, 4]] * B), mm_token_type_ids=mm, num_images=[1] * B)
    model = trainer.model
    with torch.no_grad():
        current, _, _ = trainer._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), T,
            pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"),
            num_images=[1] * B if vision else None, mm_token_type_ids=batch.get("mm_token_type_ids"))

    def near(scale):
        return (current + scale * torch.randn(B, T, generator=g)) * completion_mask

    batch.update(old_per_token_logps=near(0.3), ref_per_token_logps=near(0.3), sampling_per_token_logps=near(0.5))
    return batch


def configure(trainer, batch, loss_type, level, beta, option, seed):
    """Set the trainer's options for one case (the attributes _compute_loss reads)."""
    g = torch.Generator().manual_seed(seed + 7)
    trainer.loss_type, trainer.importance_sampling_level, trainer.beta = loss_type, level, beta
    trainer.epsilon_low, trainer.epsilon_high = 0.2, (1.5 if loss_type == "cispo" else 0.28)
    trainer.args.delta = 1.6 if loss_type in ("grpo", "dapo") else None
    trainer.top_entropy_quantile = 0.5 if option in ("entropy_mask", "all") else 1.0
    trainer.off_policy_mask_threshold = 0.05 if option in ("off_policy_mask", "all") else None
    trainer.args.use_bias_correction_kl = option in ("bias_correction_kl", "all")
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = option.startswith("vllm") or option == "all"
    shape = (B, 1) if option == "vllm_sequence_is" else (B, T)
    batch["importance_sampling_ratio"] = 0.5 + torch.rand(shape, generator=g)


def gradients(trainer, loss_fn, batch):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = loss_fn(trainer, model, batch)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_step(trainer, batch, what):
    """TRL's loss and ours: the same value and gradient of every parameter (1e-4 of its largest
    entry), and the same logged metrics. The loss to 1e-5 relative, or, where terms of both
    signs cancel to a loss near 0, to 1e-6 of one token's term (|A|, times |logp| for cispo and
    vespo, whose term is A logp: a logp of -20 carries an fp32 rounding of about 2e-6)."""
    expected_loss, expected = gradients(trainer, GRPOTrainer._compute_loss, batch)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    loss, grads = gradients(trainer, FusedGRPOTrainer._compute_loss, batch)
    ours = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    mask = batch["completion_mask"].bool()
    term = batch["advantages"].abs().mean().item()
    if trainer.loss_type in ("cispo", "vespo"):
        term *= batch["old_per_token_logps"][mask].abs().mean().item()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6 * term, msg=lambda m: f"{what} loss: {m}")
    assert set(grads) == set(expected), what
    for name, g in expected.items():
        tol = 1e-4 * g.abs().max().item() + 1e-9
        err = (grads[name] - g).abs().max().item()
        assert err <= tol, f"{what}: gradient of {name} off by {err:.3e} (max |g| {g.abs().max().item():.3e})"
    for key, value in trl_metrics.items():
        assert ours[key] == pytest.approx(value, rel=1e-4, abs=1e-6), f"{what}: metric {key}"


# beta x weight option, each loss type and level looping over them on one batch (one test each
# keeps the count of tests, and their overhead, down).
CONFIGS = [(beta, option) for beta, option in itertools.product((0.0, 0.04), OPTIONS)
           if not (option == "bias_correction_kl" and beta == 0.0)]


@pytest.mark.parametrize("loss_type,level", list(itertools.product(LOSS_TYPES, ("token", "sequence"))))
def test_text_model_matches_trl(text_trainer, tokenizer, loss_type, level, seed):
    batch = make_batch(text_trainer, tokenizer, seed, vision=False)
    for beta, option in CONFIGS:
        configure(text_trainer, batch, loss_type, level, beta, option, seed)
        assert_same_step(text_trainer, batch, f"{loss_type}/{level}/beta={beta}/{option} (seed={seed})")


@pytest.mark.parametrize("loss_type,level", list(itertools.product(LOSS_TYPES, ("token", "sequence"))))
def test_qwen2_vl_matches_trl(vl_trainer, tokenizer, loss_type, level, seed):
    batch = make_batch(vl_trainer, tokenizer, seed, vision=True)
    for beta, option in ((0.0, "none"), (0.04, "all")):
        configure(vl_trainer, batch, loss_type, level, beta, option, seed)
        assert_same_step(vl_trainer, batch, f"Qwen2-VL {loss_type}/{level}/beta={beta}/{option} (seed={seed})")


@pytest.mark.parametrize("loss_type,level", list(itertools.product(LOSS_TYPES, ("token", "sequence"))))
def test_qwen3_vl_matches_trl(qwen3_vl_trainer, tokenizer, loss_type, level, seed):
    batch = make_batch(qwen3_vl_trainer, tokenizer, seed, vision=True)
    configure(qwen3_vl_trainer, batch, loss_type, level, 0.04, "all", seed)
    assert_same_step(qwen3_vl_trainer, batch, f"Qwen3-VL {loss_type}/{level}/beta=0.04/all (seed={seed})")


@pytest.mark.parametrize("loss_type,level", [("dapo", "sequence"), ("sapo", "token")])
def test_triton_kernels_match_trl(text_trainer, tokenizer, loss_type, level, seed, monkeypatch):
    """The Triton kernels (through TRITON_INTERPRET=1 on CPU) inside the trainer, every option on."""
    monkeypatch.setattr(text_trainer, "kernel_impl", "triton")
    batch = make_batch(text_trainer, tokenizer, seed, vision=False)
    configure(text_trainer, batch, loss_type, level, 0.04, "all", seed)
    assert_same_step(text_trainer, batch, f"triton {loss_type}/{level} (seed={seed})")


def test_a_training_step_matches_trl(text_trainer, tokenizer, seed):
    """One optimizer step from the same weights and batch ends at the same weights. SGD: Adam's
    first step is lr * g / (|g| + eps) per entry, which turns rounding-level differences of
    gradient entries near 0 into differences of size lr."""
    batch = make_batch(text_trainer, tokenizer, seed, vision=False)
    configure(text_trainer, batch, "dapo", "token", 0.04, "all", seed)
    model = text_trainer.model
    start = {k: v.clone() for k, v in model.state_dict().items()}
    after = []
    for loss_fn in (GRPOTrainer._compute_loss, FusedGRPOTrainer._compute_loss):
        model.load_state_dict(start)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        gradients(text_trainer, loss_fn, batch)
        optimizer.step()
        after.append({k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(start)
    for name in start:
        torch.testing.assert_close(after[1][name], after[0][name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- PEFT


def _lora_trainer(model, tokenizer, tmp_path_factory, targets):
    """A trainer given peft_config, as TRL's takes it; the adapters' B set random (peft starts it
    at zero, where A would get no gradient)."""
    from peft import LoraConfig

    trainer = make_trainer(model, tokenizer, tmp_path_factory,
                           peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return trainer


@pytest.fixture(scope="module")
def peft_text_trainer(tokenizer, tmp_path_factory):
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return _lora_trainer(Qwen2ForCausalLM(config), tokenizer, tmp_path_factory,
                         ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("dapo", "sequence"), ("cispo", "token")])
def test_peft_model_matches_trl(peft_text_trainer, tokenizer, loss_type, level, seed):
    """peft_config as TRL takes it (LoRA on every projection; TRL refuses one on lm_head): the
    same loss and the same gradient of every adapter as TRL's."""
    from peft import PeftModel

    assert isinstance(peft_text_trainer.model, PeftModel)
    batch = make_batch(peft_text_trainer, tokenizer, seed, vision=False)
    for beta, option in ((0.0, "none"), (0.04, "all")):
        configure(peft_text_trainer, batch, loss_type, level, beta, option, seed)
        assert_same_step(peft_text_trainer, batch, f"PEFT {loss_type}/{level}/beta={beta}/{option} (seed={seed})")
    _, grads = gradients(peft_text_trainer, FusedGRPOTrainer._compute_loss, batch)
    assert grads and all("lora_" in name for name in grads)


def test_peft_qwen2_vl_matches_trl(tokenizer, tmp_path_factory, seed):
    """A Qwen2-VL with LoRA on its language model's projections (the vision tower frozen)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    trainer = _lora_trainer(Qwen2VLForConditionalGeneration(config), tokenizer, tmp_path_factory,
                            r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj")
    batch = make_batch(trainer, tokenizer, seed, vision=True)
    configure(trainer, batch, "grpo", "token", 0.04, "all", seed)
    assert_same_step(trainer, batch, f"PEFT Qwen2-VL (seed={seed})")


# ----------------------------------------------------------------------------- refusals


def test_construction_refuses_the_entropy_bonus(tokenizer, tmp_path_factory):
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match="entropy_coef"):
        make_trainer(Qwen2ForCausalLM(config), tokenizer, tmp_path_factory, entropy_coef=0.01)


def _stub(trainer, **changes):
    """The attributes unsupported_options reads, from a real trainer, some changed."""
    args = types.SimpleNamespace(**{k: getattr(trainer.args, k) for k in ("entropy_coef", "use_adaptive_entropy")})
    stub = types.SimpleNamespace(args=args, model=trainer.model, loss_type=trainer.loss_type,
                                 aux_loss_enabled=False, is_fsdp_enabled=False, is_deepspeed_enabled=False,
                                 accelerator=types.SimpleNamespace(state=types.SimpleNamespace()))
    for key, value in changes.items():
        target = args if key in vars(args) else stub
        setattr(target, key, value)
    return stub


@pytest.mark.parametrize("changes,match", [
    (dict(loss_type="ppo"), "loss_type='ppo'"),
    (dict(entropy_coef=0.01), "entropy_coef"),
    (dict(use_adaptive_entropy=True), "use_adaptive_entropy"),
    (dict(aux_loss_enabled=True), "router_aux_loss_coef"),
    (dict(is_fsdp_enabled=True), "FSDP"),
    (dict(is_deepspeed_enabled=True,
          accelerator=types.SimpleNamespace(state=types.SimpleNamespace(
              deepspeed_plugin=types.SimpleNamespace(zero_stage=3)))), "ZeRO-3"),
])
def test_unsupported_options_are_refused_by_name(text_trainer, changes, match):
    unsupported_options(_stub(text_trainer))  # the unchanged options pass
    with pytest.raises(ValueError, match=match):
        unsupported_options(_stub(text_trainer, **changes))


@pytest.mark.parametrize("attribute", ("final_logit_softcapping", "logit_scale"))
def test_transformed_logits_are_refused(text_trainer, attribute, monkeypatch):
    monkeypatch.setattr(text_trainer.model.config, attribute, 30.0, raising=False)
    with pytest.raises(ValueError, match=attribute):
        unsupported_options(_stub(text_trainer))


def test_other_vision_models_are_refused(text_trainer, monkeypatch):
    config = types.SimpleNamespace(model_type="llava", get_text_config=lambda: text_trainer.model.config)
    model = types.SimpleNamespace(config=config, get_output_embeddings=lambda: None)
    with pytest.raises(ValueError, match="model_type='llava'"):
        unsupported_options(_stub(text_trainer, model=model))


def test_per_token_advantages_are_refused(text_trainer, tokenizer):
    batch = make_batch(text_trainer, tokenizer, 0, vision=False)
    configure(text_trainer, batch, "grpo", "token", 0.0, "none", 0)
    batch["advantages"] = batch["advantages"][:, None].expand(B, T)
    with pytest.raises(ValueError, match="advantages"):
        text_trainer._compute_loss(text_trainer.model, batch)


def test_r1vl_kernels_alone_imports_neither_trl_nor_transformers():
    """`import r1vl_kernels` needs only torch and triton; r1vl_kernels.trl is imported on request."""
    code = ("import sys, r1vl_kernels; "
            "print(sorted(m for m in ('trl', 'transformers', 'r1vl_kernels.trl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
