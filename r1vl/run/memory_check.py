"""The memory plan of this run, checked at start-up before any weight is loaded: the
trainer's options turned into r1vl.run.memory_plan's inputs, the refusal of a plan that does
not fit, and the options that would make it fit."""
from __future__ import annotations

from pathlib import Path

from r1vl.config import Config
from r1vl.run.memory_plan import (
    OFFLOAD_CONFIG,
    ZERO3_CONFIG,
    EngineSpec,
    GiB,
    LoraSpec,
    MemoryPlan,
    ModelShape,
    load_model_config,
    plan_memory,
)


def dtype_bytes(cfg: Config, on_cuda: bool) -> int:
    return {"auto": 2 if on_cuda else 4, "bfloat16": 2, "float16": 2, "float32": 4}[cfg.policy.dtype]


def plan_for_config(cfg: Config, *, world_size: int, on_cuda: bool, device_bytes: float | None,
                    shape: ModelShape | None = None, checkpointing: bool | None = None,
                    engine: EngineSpec | None = None, **overrides) -> MemoryPlan:
    """The plan of a run with options `cfg` (all its stages shape it); overrides replace
    options (flat names)."""
    if shape is None:
        shape = ModelShape.from_config(model_config(cfg))
    if engine is None:
        from r1vl.deepspeed_config import read_deepspeed_config  # imports torch: only when needed

        optimizer = cfg.optimizer
        raw = (read_deepspeed_config(optimizer.deepspeed, cfg.policy.dtype, optimizer.max_grad_norm)
               if optimizer.deepspeed else None)
        engine = EngineSpec.from_deepspeed_json(raw, optimizer.deepspeed)
    if checkpointing is None:
        checkpointing = cfg.policy.activation_checkpointing == "on"
    flat = cfg.flat()
    options = {k: flat[k] for k in ("micro_batch_tokens", "batch_size", "num_generations", "max_prompt_length",
                                    "max_completion_length", "max_pixels", "beta", "share_prompts",
                                    "freeze_vision_tower", "num_iterations", "max_images")}
    options["lora"] = LoraSpec.from_config(cfg.policy)
    options.update(overrides)
    return plan_memory(shape, dtype_bytes=dtype_bytes(cfg, on_cuda), engine=engine, world_size=world_size,
                       checkpointing=checkpointing, on_cuda=on_cuda, device_bytes=device_bytes, **options)


def model_config(cfg: Config):
    """The config of --model: the built-in tiny model's, a checkpoint's config.json, or a config file."""
    if cfg.policy.model == "tiny":
        from r1vl.tiny import tiny_config

        return tiny_config(family=cfg.policy.family or "qwen2_vl")
    return load_model_config(cfg.policy.model)


def fixes(cfg: Config, plan: MemoryPlan, **where) -> list[str]:
    """The options that would make a plan fit, each tried alone, then combined."""
    from r1vl.deepspeed_config import read_deepspeed_config

    root = Path(__file__).resolve().parents[2]  # the repository: configs/
    found = []

    def fits(**change) -> MemoryPlan:
        args = {"checkpointing": plan.checkpointing, "engine": plan.engine, **where, **change}
        return plan_for_config(cfg, shape=plan.shape, **args)

    def say(text: str, p: MemoryPlan) -> None:
        found.append(f"{text}  (peak {p.peak / GiB:.1f} GiB)")

    if not plan.checkpointing and (p := fits(checkpointing=True)).fits:
        say("--activation_checkpointing on", p)
    sampling = cfg.sampling
    least = sampling.max_prompt_length + sampling.max_completion_length
    for tokens in sorted({max(least, cfg.memory.micro_batch_tokens >> k) for k in range(1, 8)}, reverse=True):
        if tokens < plan.micro_batch_tokens and (p := fits(micro_batch_tokens=tokens)).fits:
            say(f"--micro_batch_tokens {tokens}", p)
            break
    G = sampling.num_generations
    for b in range(sampling.batch_size - G, 0, -G):
        if (p := fits(batch_size=b)).fits:
            say(f"--batch_size {b} (fewer rollout sequences at a time)", p)
            break
    engines = []
    if plan.engine.zero_stage != 3:
        engines.append((ZERO3_CONFIG, ZERO3_CONFIG))
    if not plan.engine.offload_optimizer:
        engines.append((OFFLOAD_CONFIG, OFFLOAD_CONFIG))
    for name, path in engines:
        raw = read_deepspeed_config(str(root / path), "auto", cfg.optimizer.max_grad_norm)
        spec = EngineSpec.from_deepspeed_json(raw, name)
        if (p := fits(engine=spec)).fits:
            say(f"--deepspeed {name}" + ("" if plan.world_size > 1 else " (shards over GPUs: more GPUs help)"), p)
        elif (p := fits(engine=spec, checkpointing=True)).fits:
            say(f"--deepspeed {name} with --activation_checkpointing on", p)
    if not cfg.policy.freeze_vision_tower and (p := fits(freeze_vision_tower=True)).fits:
        say("--freeze_vision_tower true", p)
    if not found:
        found.append("nothing alone or paired fits: more GPUs with --deepspeed configs/zero3_offload.json, shorter "
                     "--max_completion_length, smaller --max_pixels")
    return found


def device_memory(cfg: Config, world_size: int) -> tuple[bool, float | None]:
    """(on CUDA, the device memory the plan is checked against): --gpu_memory_gb if given, the
    GPU's own on a CUDA run, None on a CPU run."""
    import torch

    memory = cfg.memory
    on_cuda = memory.device == "cuda" or (memory.device == "auto" and torch.cuda.is_available())
    if memory.plan and memory.device == "auto" and not torch.cuda.is_available() and memory.gpu_memory_gb > 0:
        on_cuda = True  # planning a GPU run from a machine without one
    if memory.gpu_memory_gb > 0:
        return on_cuda, memory.gpu_memory_gb * GiB
    if on_cuda and torch.cuda.is_available():
        return True, float(torch.cuda.get_device_properties(0).total_memory)
    return on_cuda, None


def check_plan(cfg: Config, world_size: int):
    """At start-up, before any weight is loaded: the plan of this run. Resolves
    --activation_checkpointing auto (on exactly when the plan without it does not fit the
    device). Returns (cfg with it resolved, the plan). Raises PlanDoesNotFit naming the
    options that would make it fit; a CPU run is never refused."""
    on_cuda, device = device_memory(cfg, world_size)
    where = dict(world_size=world_size, on_cuda=on_cuda, device_bytes=device)
    shape = ModelShape.from_config(model_config(cfg))
    if cfg.policy.activation_checkpointing == "auto":
        without = plan_for_config(cfg, shape=shape, checkpointing=False, **where)
        cfg = cfg.replace(activation_checkpointing="off" if without.fits else "on")
    plan = plan_for_config(cfg, shape=shape, **where)
    if not plan.fits:
        raise PlanDoesNotFit(plan.format() + "\n\nthe plan does not fit; any of these would make it fit:\n"
                             + "\n".join(f"  {f}" for f in fixes(cfg, plan, **where)))
    return cfg, plan


class PlanDoesNotFit(ValueError):
    """A run whose memory plan exceeds the device, refused before loading anything."""
