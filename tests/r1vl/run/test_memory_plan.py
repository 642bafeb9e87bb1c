"""The memory plan (r1vl.run.memory_plan) against what is actually allocated and saved on CPU:
activation bytes counted with saved_tensors_hooks (one full-width Qwen2-VL-2B decoder layer
in bf16, and the tiny model end to end, with and without checkpointing) within 10%; weights,
gradients, optimizer state, the rollout's KV cache and the decode step's fused weights
against the tensors themselves; a plan that does not fit refused before loading."""
import copy
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from tiny_qwen_vl import FAMILIES, grpo_batch, tiny_model

from r1vl.config import make_config
from r1vl.model.activation_checkpointing import enable_activation_checkpointing
from r1vl.model.attention import register, use_varlen_attention
from r1vl.run.memory_check import PlanDoesNotFit, check_plan
from r1vl.run.memory_plan import EngineSpec, ModelShape, load_model_config, plan_memory
from r1vl.sampling.decode import fuse_layers
from r1vl.sampling.kv_cache import RolloutCache
from r1vl.tiny import tiny_config
from r1vl.update.engine import PlainEngine, UpdateSettings
from r1vl.update.losses import policy_loss
from r1vl.update.packing import pack

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))  # SavedTensors: a measuring tool of benchmarks/, not of the trainer
from saved_tensors import SavedTensors  # noqa: E402

LOSS = dict(temperature=1.0, beta=0.0, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo", max_completion_length=16)


def _batch_tensors(packed):
    return [getattr(packed, f) for f in vars(packed) if isinstance(getattr(packed, f), torch.Tensor)]


# -------------------------------------------------------------------------------- activations


def _layer_2b(T: int, checkpointing: bool):
    """(measured, planned) saved bytes of one Qwen2-VL-2B decoder layer, bf16, T packed
    tokens in two sequences, r1vl's sdpa varlen attention."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer, Qwen2VLRotaryEmbedding

    config = load_model_config(str(ROOT / "configs" / "qwen2_vl_2b.json"))
    text = config.get_text_config()
    text._attn_implementation = register("sdpa")
    torch.manual_seed(0)
    layer = Qwen2VLDecoderLayer(text, 0).to(torch.bfloat16).train()
    if checkpointing:
        import functools

        from torch.utils.checkpoint import checkpoint

        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
    x = torch.randn(1, T, text.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(T).view(1, 1, T).expand(3, 1, T)
    cos, sin = Qwen2VLRotaryEmbedding(text)(x, positions)
    cu = torch.tensor([0, T // 2, T], dtype=torch.int32)
    wrapper = torch.nn.ModuleList([layer])  # SavedTensors finds the layer among the modules
    with SavedTensors(wrapper, exclude=[x, cos, sin, cu], count_checkpoint_keywords=False) as saved:
        out = layer(x, position_embeddings=(cos, sin), attention_mask=None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                    max_length_q=T // 2, max_length_k=T // 2)
    saved_bytes = saved.bytes + (x.nbytes if checkpointing else 0)  # the checkpoint keeps the input x
    out.float().sum().backward()
    shape = ModelShape.from_config(config)
    planned = T * 2 * shape.hidden if checkpointing else shape.layer_activation_bytes(2, T)
    return saved_bytes, planned


@pytest.mark.parametrize("checkpointing", [False, True])
def test_full_width_2b_decoder_layer_saves_what_the_plan_says(checkpointing):
    measured, planned = _layer_2b(T=128, checkpointing=checkpointing)
    assert abs(measured - planned) <= 0.10 * planned, (measured, planned)
    if not checkpointing:  # 104.1 KiB per token at the 2B shape (without the shared cos/sin)
        assert measured / 128 == pytest.approx(106552, rel=0.01)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("share_prompts", [False, True])
def test_tiny_model_forward_saves_what_the_plan_says(checkpointing, share_prompts, family):
    import transformers

    from r1vl.model.families import FAMILIES as MODEL_CLASSES

    config = tiny_config(vocab_size=128, ids={"<|im_end|>": 1, "<|endoftext|>": 0, "<|image_pad|>": 120,
                                              "<|video_pad|>": 121, "<|vision_start|>": 122, "<|vision_end|>": 123},
                         family=family)
    torch.manual_seed(0)
    model = getattr(transformers, MODEL_CLASSES[family].model_class)(config).float()
    use_varlen_attention(model, "sdpa")
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    packed = pack(grpo_batch(seed=2, G=4, family=family), model, share_prompts=share_prompts)
    with SavedTensors(model, exclude=_batch_tensors(packed)) as saved:
        out = policy_loss(model, packed, torch.randn(packed.num_sequences), None, None, impl="torch", **LOSS)
    out.loss.backward()
    shape = ModelShape.from_config(config)
    T, N = packed.num_tokens, packed.target_ids.numel()
    keys = packed.key_index.numel() if packed.shares_prompts else T
    planned = shape.language_activation_bytes(4, T, keys, N, checkpointing, recompute=False) \
        + shape.vision_activation_bytes(4, packed.pixel_values.shape[0], checkpointing, recompute=False)
    assert abs(saved.bytes - planned) <= 0.10 * planned, (saved.bytes, planned)


# -------------------------------------------------------------------------------- allocated tensors


def _world():
    return types.SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), is_main=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_is_the_models(family):
    model = tiny_model(family)
    assert ModelShape.from_config(model.config).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("freeze_vision_tower", [False, True])
def test_weights_gradients_and_optimizer_state_are_the_tensors_allocated(freeze_vision_tower, dtype):
    """The plain engine's: bf16 weights get fp32 masters, fp32 gradients and fp32 AdamW moments."""
    model = tiny_model("qwen2_vl").to(dtype)
    use_varlen_attention(model)
    if freeze_vision_tower:
        model.model.visual.requires_grad_(False)
    engine = PlainEngine(model, UpdateSettings(lr=1e-3, total_steps=1), _world())
    engine.train()
    packed = pack(grpo_batch(seed=0, G=2), model, share_prompts=True)
    engine.backward(engine.forward(policy_loss, packed, torch.randn(packed.num_sequences), None, None,
                                   impl="torch", **LOSS).loss)
    gradients = sum(p.grad.nbytes for p in [*model.parameters(), *engine.masters.values()] if p.grad is not None)
    engine.step(True)
    state = sum(t.nbytes for s in engine.optimizer.state.values() for k, t in s.items() if k != "step")
    plan = plan_memory(ModelShape.from_config(model.config), dtype_bytes=dtype.itemsize, engine=EngineSpec(),
                       world_size=1, checkpointing=False, micro_batch_tokens=256, batch_size=4, num_generations=2,
                       max_prompt_length=64, max_completion_length=32, max_pixels=3136, beta=0.04,
                       freeze_vision_tower=freeze_vision_tower, on_cuda=False)
    assert plan.item("weights") == sum(p.nbytes for p in model.parameters())
    assert plan.item("reference model") == sum(p.nbytes for p in copy.deepcopy(model).parameters())
    assert plan.item("gradients") == gradients
    assert plan.item("optimizer state") == state
    assert plan.item("master weights") == sum(m.nbytes for m in engine.masters.values())
    assert (plan.item("master weights") > 0) == (dtype == torch.bfloat16)


@pytest.mark.parametrize("on_cuda", [False, True])
def test_kv_cache_and_fused_decode_weights_are_the_tensors_allocated(on_cuda):
    model = tiny_model("qwen2_vl")
    shape = ModelShape.from_config(model.config)
    prompts, G, P, C = 3, 4, 50, 20
    text = model.config.get_text_config()
    cache = RolloutCache.allocate([P] * prompts, G, C, text.num_hidden_layers, text.num_key_value_heads,
                                  text.hidden_size // text.num_attention_heads, torch.float32, torch.device("cpu"),
                                  prefix_capacity=64 if on_cuda else None)  # CUDA: rounded up to 64 (r1vl.sampling.generate)
    plan = plan_memory(shape, dtype_bytes=4, engine=EngineSpec(), world_size=1, checkpointing=False,
                       micro_batch_tokens=1024, batch_size=prompts * G, num_generations=G, max_prompt_length=P,
                       max_completion_length=C, max_pixels=3136, beta=0.0, on_cuda=on_cuda)
    assert plan.item("rollout KV cache") == cache.nbytes()
    assert plan.item("decode fused weights") == sum(t.nbytes for layer in fuse_layers(model) for t in layer
                                                    if t.data_ptr() not in {p.data_ptr() for p in model.parameters()})


def test_shipped_configs_give_the_published_parameter_counts():
    for name, billions in (("qwen2_vl_2b", 2.209), ("qwen2_vl_7b", 8.291)):
        shape = ModelShape.from_config(load_model_config(str(ROOT / "configs" / f"{name}.json")))
        assert shape.params / 1e9 == pytest.approx(billions, abs=1e-3)


# -------------------------------------------------------------------------------- fitting and refusing


def test_readme_recipes_fit_by_the_plan():
    """2B on one 80 GB GPU (plain engine); 7B on 4 x 80 GB with ZeRO-3: the README's commands."""
    two = make_config(model=str(ROOT / "configs" / "qwen2_vl_2b.json"), plan=True, gpu_memory_gb=80.0,
                      activation_checkpointing="on")
    _, plan = check_plan(two, world_size=1)
    assert plan.fits and plan.device_bytes == 80 * 2**30
    seven = make_config(model=str(ROOT / "configs" / "qwen2_vl_7b.json"), plan=True, gpu_memory_gb=80.0,
                        deepspeed=str(ROOT / "configs" / "zero3.json"), activation_checkpointing="on")
    _, plan = check_plan(seven, world_size=4)
    assert plan.fits and plan.engine.zero_stage == 3


def test_auto_checkpointing_is_decided_by_the_plan():
    base = dict(model=str(ROOT / "configs" / "qwen2_vl_2b.json"), plan=True, gpu_memory_gb=80.0)
    small, _ = check_plan(make_config(**base), world_size=1)  # one prompt per rank: fits without it
    assert small.policy.activation_checkpointing == "off"
    big, plan = check_plan(make_config(**base, batch_size=32), world_size=1)  # 16384-token micro-batches
    assert big.policy.activation_checkpointing == "on" and plan.checkpointing
    cpu, _ = check_plan(make_config(), world_size=1)  # the tiny CPU demo: no device limit, no checkpointing
    assert cpu.policy.activation_checkpointing == "off"


def test_plan_that_does_not_fit_names_the_fixes():
    """2B in bf16 on the plain engine (fp32 masters, moments and gradients: 16 bytes per
    parameter) on 72 GB: each of the three fixes alone makes it fit."""
    cfg = make_config(model=str(ROOT / "configs" / "qwen2_vl_2b.json"), plan=True, gpu_memory_gb=72.0,
                      activation_checkpointing="off", batch_size=32)
    with pytest.raises(PlanDoesNotFit) as info:
        check_plan(cfg, world_size=1)
    message = str(info.value)
    assert "memory plan, per GPU" in message and "does not fit" in message
    for fix in ("--activation_checkpointing on", "--micro_batch_tokens", "--batch_size"):
        assert fix in message, message


def test_train_refuses_before_loading_any_weight(tmp_path, capsys):
    """A checkpoint directory whose weights file is empty: loading it would fail differently."""
    import train

    model = tmp_path / "qwen7b"
    model.mkdir()
    (model / "config.json").write_text((ROOT / "configs" / "qwen2_vl_7b.json").read_text())
    for name in ("model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        (model / name).write_text("")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"problem": "1+1?", "solution": "2", "image_path": "a.png"}) + "\n")
    from PIL import Image

    Image.new("RGB", (28, 28)).save(tmp_path / "a.png")  # valid data: the data is checked before the plan
    with pytest.raises(SystemExit) as info:
        train.main(["--model", str(model), "--data", str(data), "--gpu_memory_gb", "80", "--batch_size", "16",
                    "--run_dir", str(tmp_path / "run")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "the plan does not fit" in err and "--deepspeed configs/zero3" in err, err
    assert not (tmp_path / "run").exists()  # stopped before the run directory, the model, anything


def test_max_images_counts_that_many_images_per_prompt():
    """--max_images 2: the update's vision tower holds twice the patches of one image per
    prompt; the language model's tokens stay bounded by the prompt length."""
    from r1vl.run.memory_check import plan_for_config

    def vision(**options):
        cfg = make_config(model=str(ROOT / "configs" / "qwen2_vl_2b.json"), plan=True, **options)
        plan = plan_for_config(cfg, world_size=1, on_cuda=True, device_bytes=80e9)
        item = next(i for i in plan.update if i.name == "activations, vision tower")
        return item.bytes, next(i for i in plan.update if i.name == "activations, language model").bytes

    one, two = vision(max_images=1), vision(max_images=2)
    assert two[0] == pytest.approx(2 * one[0]) and two[1] == one[1]
    assert vision()[0] == one[0]  # the default is one image
# -------------------------------------------------------------------------------- LoRA


def _lora_model(family: str, dtype: torch.dtype, rank: int = 4):
    from r1vl.model.lora import add_adapters

    model = tiny_model(family).to(dtype)
    add_adapters(model, make_config(lora_rank=rank).policy)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_adapters_gradients_and_optimizer_state_are_the_tensors_allocated(dtype):
    """With LoRA the base is frozen and only the adapters (in the weights' dtype, fp32 masters
    under bf16) train; the reference costs nothing (the adapters off)."""
    from r1vl.run.memory_plan import LoraSpec

    model = _lora_model("qwen2_vl", dtype)
    use_varlen_attention(model)
    engine = PlainEngine(model, UpdateSettings(lr=1e-3, total_steps=1), _world())
    engine.train()
    packed = pack(grpo_batch(seed=0, G=2), model, share_prompts=True)
    engine.backward(engine.forward(policy_loss, packed, torch.randn(packed.num_sequences), None, None,
                                   impl="torch", **LOSS).loss)
    gradients = sum(p.grad.nbytes for p in [*model.parameters(), *engine.masters.values()] if p.grad is not None)
    engine.step(True)
    state = sum(t.nbytes for s in engine.optimizer.state.values() for k, t in s.items() if k != "step")
    plan = plan_memory(ModelShape.from_config(model.config), dtype_bytes=dtype.itemsize, engine=EngineSpec(),
                       world_size=1, checkpointing=False, micro_batch_tokens=256, batch_size=4, num_generations=2,
                       max_prompt_length=64, max_completion_length=32, max_pixels=3136, beta=0.04, on_cuda=False,
                       lora=LoraSpec(rank=4))
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert plan.item("LoRA adapters") == sum(p.nbytes for p in adapters) > 0
    assert plan.item("weights") == sum(p.nbytes for n, p in model.named_parameters() if "lora_" not in n)
    assert plan.item("reference model") == 0
    assert plan.item("gradients") == gradients
    assert plan.item("optimizer state") == state
    assert plan.item("master weights") == sum(m.nbytes for m in engine.masters.values())
    assert (plan.item("master weights") > 0) == (dtype == torch.bfloat16)
    with_vision = plan_memory(ModelShape.from_config(model.config), dtype_bytes=4, engine=EngineSpec(), world_size=1,
                              checkpointing=False, micro_batch_tokens=256, batch_size=4, num_generations=2,
                              max_prompt_length=64, max_completion_length=32, max_pixels=3136, beta=0.04,
                              on_cuda=False, lora=LoraSpec(rank=4, vision=True))
    vision_model = tiny_model("qwen2_vl")
    from r1vl.model.lora import add_adapters

    add_adapters(vision_model, make_config(lora_rank=4, lora_vision=True, freeze_vision_tower=False).policy)
    assert with_vision.item("LoRA adapters") == sum(p.nbytes for n, p in vision_model.named_parameters()
                                                    if "lora_" in n)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_forward_saves_what_the_plan_says(checkpointing, family):
    from r1vl.run.memory_plan import LoraSpec

    model = _lora_model(family, torch.float32, rank=8)
    use_varlen_attention(model, "sdpa")
    if checkpointing:
        enable_activation_checkpointing(model)
        # The frozen tower's checkpointed blocks keep nothing (no output of theirs requires
        # grad, so the checkpoint's frame is dropped), but the counter would count their inputs.
        for block in model.model.visual.blocks:
            block.gradient_checkpointing = False
    model.train()
    packed = pack(grpo_batch(seed=2, G=4, family=family), model, share_prompts=True)
    with SavedTensors(model, exclude=_batch_tensors(packed)) as saved:
        out = policy_loss(model, packed, torch.randn(packed.num_sequences), None, None, impl="torch", **LOSS)
    out.loss.backward()
    shape = ModelShape.from_config(model.config)
    T, N = packed.num_tokens, packed.target_ids.numel()
    # The frozen vision tower saves nothing for backward; each layer's adapters add their A
    # outputs, which a checkpointed layer recomputes in backward instead.
    planned = shape.language_activation_bytes(4, T, packed.key_index.numel(), N, checkpointing, recompute=False,
                                              frozen=True) \
        + (0 if checkpointing else shape.layers * shape.lora_layer_activation_bytes(LoraSpec(rank=8), 4, T))
    assert abs(saved.bytes - planned) <= 0.10 * planned, (saved.bytes, planned)


def test_lora_recipes_fit_on_one_gpu():
    """The paper's 7B with LoRA rank 64 on one 80 GB GPU; the 2B with rank 64 on one 24 GB GPU."""
    seven = make_config(model=str(ROOT / "configs" / "qwen2_vl_7b.json"), plan=True, gpu_memory_gb=80.0, lora_rank=64)
    _, plan = check_plan(seven, world_size=1)
    assert plan.fits and plan.item("reference model") == 0
    full = make_config(model=str(ROOT / "configs" / "qwen2_vl_7b.json"), plan=True, gpu_memory_gb=80.0,
                       activation_checkpointing="on")
    with pytest.raises(PlanDoesNotFit):  # without LoRA it does not fit one GPU
        check_plan(full, world_size=1)
    two = make_config(model=str(ROOT / "configs" / "qwen2_vl_2b.json"), plan=True, gpu_memory_gb=24.0, lora_rank=64)
    _, plan = check_plan(two, world_size=1)
    assert plan.fits and plan.device_bytes == 24 * 2**30
