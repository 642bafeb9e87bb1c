"""DeepSpeed ZeRO-2 / ZeRO-3 behind r1vl's engine interface (r1vl.update.engine).

    torchrun --nproc_per_node 8 train.py --deepspeed configs/zero3.json --model PATH --data train.jsonl

The JSON is a plain DeepSpeed config; r1vl keeps what it owns and fills the rest:
- The update is PlainEngine's: torch's AdamW and r1vl's warm-up/decay schedule go to
  deepspeed.initialize as client objects (DeepSpeed runs that AdamW on its fp32 shard), so the
  JSON may not hold "optimizer" or "scheduler"; gradient_clipping is --max_grad_norm.
- A step is however many packed micro-batches a rank has (r1vl.update.packing), each loss already
  weighted by its share of the global batch so that gradients SUM over ranks. DeepSpeed
  averages over ranks and divides by gradient_accumulation_steps, so r1vl sets that to 1,
  multiplies every loss by the world size, and sets managed_gradient_accumulation to false:
  engine.step() is then the accumulation boundary however many backward calls preceded it.
  train_batch_size / train_micro_batch_size_per_gpu / gradient_accumulation_steps are
  therefore "auto" or absent.
- bf16.enabled follows --dtype ("auto", or a value that agrees with it); fp16 is refused.

ZeRO runs collectives inside every forward (ZeRO-3 gathers each layer's weights) and backward
(gradients are reduced as they appear), so every rank must run as many of each:
`lockstep` pads a rank's micro-batches with zero-weighted idle batches (one blank-image
sequence, packed once per engine).

Under ZeRO-3 a parameter outside its module's forward is an empty placeholder. The fused loss
reads lm_head.weight directly (r1vl.update.losses passes it to the kernel), so every training-time
computation runs as the forward of `_Forward`, a module that holds the policy and has
lm_head.weight registered as its external parameter: DeepSpeed gathers it for that forward,
gathers it again before that forward's backward, and reduces its gradient like any other.
The rollout calls the model's parts directly, so it runs inside `gathered()`: all weights
gathered once and the per-module hooks lifted (deepspeed.runtime.zero.unwrap_model_for_generation).
The KL reference is sharded too: a second, inference-only ZeRO-3 engine (ShardedReference).

Checkpoints (save_state / load_state): each rank's shard of the ZeRO optimizer state, reduced
to tensors and numbers, goes through torch.save and comes back through
torch.load(weights_only=True). DeepSpeed's own save_checkpoint / load_checkpoint are not used:
they pickle objects (the loss scaler, enums, slice maps), read everything back with
torch.load(weights_only=False), and would write the weights a second time.

deepspeed is imported only here, when an engine is built: plain runs never import it.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import warnings
from pathlib import Path

import torch

from r1vl import distributed
from r1vl.deepspeed_config import resolved_config
from r1vl.model.attention import attention_implementations
from r1vl.model.lora import has_adapters
from r1vl.update.engine import (
    AdaptersOff,
    Engine,
    Frozen,
    UpdateSettings,
    adamw_with_schedule,
    read_engine_json,
    write_engine_json,
)
from r1vl.update.packing import Sequence, pack

# -------------------------------------------------------------------------------- the engine


class _Forward(torch.nn.Module):
    """The module DeepSpeed wraps: the policy as its child, and a forward that runs a function
    of it. Under ZeRO-3, lm_head.weight is registered as this module's external parameter
    (the fused loss reads it outside lm_head's forward), so DeepSpeed gathers it for this
    forward and for its backward."""

    def __init__(self, model: torch.nn.Module, sharded: bool):
        super().__init__()
        self.model = model
        if sharded:
            import deepspeed

            deepspeed.zero.register_external_parameter(self, model.lm_head.weight)

    def forward(self, fn):
        return fn(self.model)


def _run(ds_engine, fn, args, kwargs):
    """fn(model, *args, **kwargs) as the forward of the DeepSpeed engine's _Forward. A
    dataclass result (GRPOLossOutput) goes out as a dict and is rebuilt: ZeRO-3 hooks its
    pre-backward gathering onto the tensors it can find in the output, which must therefore
    be a tensor, a tuple/list or a dict."""
    kind = {}

    def call(model):
        out = fn(model, *args, **kwargs)
        if dataclasses.is_dataclass(out):
            kind["type"] = type(out)
            return {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        return out

    out = ds_engine(call)
    return kind["type"](**out) if kind else out


def _poisoned(loss: torch.Tensor) -> torch.Tensor:
    """`loss`, whose gradient becomes NaN when its value is not finite: 0 * loss is 0 for a
    finite loss and NaN otherwise. DeepSpeed then sees a non-finite gradient norm on every
    rank (gradients are reduced) and skips the update everywhere, with no extra host sync."""
    return loss * (loss.detach() * 0 + 1)


class DeepSpeedEngine(Engine):
    """AdamW + LambdaLR on `model` inside a DeepSpeed ZeRO-2/3 engine; PlainEngine's interface.

    Args:
        model: the policy, on its device, identical on every rank (or already sharded by an
            earlier stage's ZeRO-3 engine); it stays `model` (the engine wraps it, never copies it).
        settings: the rate, its schedule, AdamW's, clipping, the skip limit.
        path, raw: the --deepspeed file and its JSON (r1vl.deepspeed_config.read_deepspeed_config).
        idle: the sequence `lockstep` pads with; None: padding is refused.
    """

    def __init__(self, model: torch.nn.Module, settings: UpdateSettings, path: str, raw: dict,
                 world: distributed.Dist, idle: Sequence | None = None):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != world.device.type:
            raise ValueError(f"--deepspeed: DeepSpeed's accelerator is {get_accelerator().device_name()!r} but the "
                             f"run is on {world.device}; set DS_ACCELERATOR={world.device.type} or --device")
        # DeepSpeed calls collectives that this torch deprecates; the warning (one per call
        # site and rank) is nothing a user of r1vl can act on.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        self.model, self.world = model, world
        # Packed before ZeRO shards anything; (None, idle batch) entries are weighted 0.
        self._idle_batch = pack([idle], model).to(world.device) if idle is not None else None
        self.max_bad_steps, self.skipped = settings.max_bad_steps, 0
        dtype = next(model.parameters()).dtype
        self.config = resolved_config(raw, path, dtype, settings.max_grad_norm, world.world_size)
        self.stage = self.config["zero_optimization"]["stage"]
        optimizer, self.scheduler = adamw_with_schedule([p for p in model.parameters() if p.requires_grad], settings)
        self._ds, *_ = deepspeed.initialize(model=_Forward(model, sharded=self.stage == 3), optimizer=optimizer,
                                            lr_scheduler=self.scheduler, config=self.config)

    # ------------------------------------------------------------------ the update

    def forward(self, fn, *args, **kwargs):
        """fn(model, *args, **kwargs) inside the engine's forward (see _Forward)."""
        return _run(self._ds, fn, args, kwargs)

    def lockstep(self, microbatches: list) -> list:
        """`microbatches` padded with (None, idle batch) to the largest count over ranks."""
        most = int(distributed.all_reduce_max([len(microbatches)], self.world.device)[0])
        if most == len(microbatches):
            return microbatches
        if self._idle_batch is None:
            raise ValueError("DeepSpeedEngine.lockstep: this rank must pad its micro-batches but the engine "
                             "was built without an idle sequence (make_engine(..., idle=...))")
        return microbatches + [(None, self._idle_batch)] * (most - len(microbatches))

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate d(loss)/d(params). DeepSpeed averages gradients over ranks; r1vl's losses
        are shares of the global batch whose gradients must sum, hence the world size."""
        self._ds.backward(_poisoned(loss) * self.world.world_size, scale_wrt_gas=False)

    def step(self, loss_finite: bool) -> float:
        """Reduce, clip and apply the accumulated gradient, or skip the update on every rank
        when its norm is not finite (a non-finite loss on any rank makes it so, see
        _poisoned; `loss_finite` itself is therefore not needed). Returns the norm before
        clipping. Raises NonFiniteUpdates after max_bad_steps skipped updates."""
        self._ds.step()
        norm = self._ds.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        if not self._ds.was_step_applied():
            self._skip(norm)
        return norm

    def gathered(self):
        """ZeRO-3: every parameter gathered and the per-module hooks lifted for the duration
        (the rollout's KV-cache decoding calls the model's parts directly). ZeRO-2: a no-op."""
        if self.stage != 3:
            return contextlib.nullcontext()
        from deepspeed.runtime.zero import unwrap_model_for_generation

        return _yielding_nothing(unwrap_model_for_generation(self._ds))

    def reference(self, model: torch.nn.Module | None = None):
        """The KL reference, frozen: `model` (a plain copy the caller loaded) or, when None, a
        copy of the policy as it is now. ZeRO-2 keeps it whole on every rank (as PlainEngine);
        ZeRO-3 shards it like the policy (ShardedReference). With LoRA: the policy with its
        adapters off, through this engine (AdaptersOff), no copy."""
        if model is None and has_adapters(self.model):
            return AdaptersOff(self)
        if self.stage != 3:
            return Frozen(copy.deepcopy(self.model) if model is None else model)
        return ShardedReference(sharded_copy(self.model, self.config) if model is None else model, self.config)

    def train(self) -> None:
        self._ds.train()

    def eval(self) -> None:
        self._ds.eval()

    def close(self) -> None:
        """Remove DeepSpeed's hooks and free the optimizer state. Under ZeRO-3 the model stays
        sharded: the next stage's engine takes it as it is, and distributed.gathered()
        gathers it for the final save."""
        if self._ds is not None:
            self._ds.destroy()
            self._ds = None
            self.scheduler.optimizer.state.clear()  # the AdamW moments of this rank's shard
            gc.collect()  # DeepSpeed's engine holds reference cycles (hooks closing over it)

    # ------------------------------------------------------------------ checkpoints

    def save_state(self, directory: Path) -> None:
        """Each rank writes its shard of the optimizer state (fp32 master weights, AdamW
        moments) as zero_rank{r}.pt, plain tensors and numbers only; rank 0 writes engine.json
        (schedule, skipped count, stage, world size). The weights are saved by the caller."""
        state = plain_optimizer_state(self._ds.optimizer.state_dict())
        torch.save(state, directory / f"zero_rank{self.world.rank:05d}.pt")
        if self.world.is_main:
            write_engine_json(directory, self.scheduler, self.skipped, zero_stage=self.stage,
                              world_size=self.world.world_size)

    def load_state(self, directory: Path) -> None:
        """Inverse of save_state, on as many ranks with the same stage; each rank reads its own
        file with torch.load(weights_only=True). Under ZeRO-3 this also sets the weights from
        the saved fp32 master copy; under ZeRO-2 the caller loads the weights."""
        extra = read_engine_json(directory)
        if "zero_stage" not in extra:
            raise ValueError(f"{directory}: written without --deepspeed; resume it without --deepspeed")
        if (extra["zero_stage"], extra["world_size"]) != (self.stage, self.world.world_size):
            raise ValueError(f"{directory}: saved by ZeRO-{extra['zero_stage']} on {extra['world_size']} ranks; "
                             f"this run is ZeRO-{self.stage} on {self.world.world_size} (resume needs the same)")
        state = torch.load(directory / f"zero_rank{self.world.rank:05d}.pt", map_location=self.world.device,
                           weights_only=True)
        optimizer = self._ds.optimizer
        state = _restored_optimizer_state(state, optimizer)
        # DeepSpeed takes the list of every rank's state and reads its own entry; rigid
        # (non-elastic) checkpoints on the same ranks read nothing else.
        states = [None] * self.world.world_size
        states[self.world.rank] = state
        optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
        self.skipped = read_engine_json(directory, self.scheduler)["skipped"]


@contextlib.contextmanager
def _yielding_nothing(context):
    with context:
        yield


# Entries of a ZeRO optimizer's state_dict that are not plain data: the loss scaler (static
# 1 without fp16; the live one is put back on load) and the slice map that only DeepSpeed's
# universal-checkpoint converter reads. zero_stage is an enum, saved as its int.
_DROPPED = ("loss_scaler", "param_slice_mappings")


def plain_optimizer_state(state: dict) -> dict:
    """A ZeRO optimizer's state_dict as tensors, numbers, strings and containers only, so that
    torch.load(weights_only=True) reads it back. Raises TypeError on anything else."""
    out = {k: v for k, v in state.items() if k not in _DROPPED}
    if "zero_stage" in out:
        out["zero_stage"] = int(out["zero_stage"])
    _check_plain(out, "optimizer state")
    return out


def _check_plain(value, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, (torch.Tensor, int, float, bool, str, type(None))):
        raise TypeError(f"{where} is a {type(value).__name__}; only plain data is saved")


def _restored_optimizer_state(state: dict, optimizer) -> dict:
    from deepspeed.runtime.zero.config import ZeroStageEnum

    state = dict(state)
    state["loss_scaler"] = optimizer.loss_scaler
    if "zero_stage" in state:
        state["zero_stage"] = ZeroStageEnum(state["zero_stage"])
    return state


# -------------------------------------------------------------------------------- the reference


class ShardedReference:
    """The KL reference under ZeRO-3: a frozen model inside a DeepSpeed inference engine
    (ZeRO-3, no optimizer) whose hooks gather each layer for its forward.
    `forward(fn, *args)` is fn(model, *args) without gradient, as Frozen.forward.

    model: a plain model (DeepSpeed partitions it in place; every rank held it whole until
        then, as at load time) or one already sharded (sharded_copy).
    config: the policy engine's resolved config (only the ZeRO and precision keys are used).
    """

    def __init__(self, model: torch.nn.Module, config: dict):
        import deepspeed

        model.eval().requires_grad_(False)
        self._ds, *_ = deepspeed.initialize(model=_Forward(model, sharded=True), config=_inference_config(config))
        self._ds.eval()

    @torch.no_grad()
    def forward(self, fn, *args, **kwargs):
        return _run(self._ds, fn, args, kwargs)

    def close(self) -> None:
        if self._ds is not None:
            self._ds.destroy()
            self._ds = None


def _inference_config(config: dict) -> dict:
    return {k: v for k, v in config.items()
            if k in ("zero_optimization", "bf16", "fp16", "train_batch_size", "steps_per_print",
                     "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")}


def sharded_copy(policy: torch.nn.Module, config: dict) -> torch.nn.Module:
    """A copy of a ZeRO-3 sharded policy, sharded the same way, that no rank ever holds
    whole: built under deepspeed.zero.Init, which partitions every parameter as its module is
    created (weight initialization skipped, as transformers does for ZeRO-3: the values are
    copied next), then filled one parameter at a time from the policy's gathered weights."""
    import deepspeed
    from transformers.initialization import no_init_weights

    dtype = next(policy.parameters()).dtype
    # Built with sdpa, then switched to the policy's attention (r1vl.model.attention registers
    # its packed kernels under names transformers would try to resolve at construction).
    attention = attention_implementations(policy)
    model_config = copy.deepcopy(policy.config)
    model_config.text_config._attn_implementation = model_config.vision_config._attn_implementation = "sdpa"
    # zero.Init takes the dtype from the config's bf16 flag (its own dtype= argument is
    # ignored on accelerators without fp16). mem_efficient_linear=False: its replacement of
    # torch.nn.functional.linear would outlive the context, and a frozen copy needs no
    # weight re-gathering in backward.
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=_inference_config(config),
                                                mem_efficient_linear=False):
        model = type(policy)._from_config(model_config, dtype=dtype, attn_implementation="sdpa")
    model.tie_weights()  # as transformers does after a ZeRO-3 construction (Qwen2-VL-2B ties lm_head)
    if next(model.parameters()).dtype != dtype:
        raise RuntimeError(f"the sharded reference was built in {next(model.parameters()).dtype}, not {dtype}")
    model.set_attn_implementation(attention)
    _copy_sharded(policy, model)
    return model


def _copy_sharded(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """dst's weights := src's, both ZeRO-3 sharded with the same structure: one parameter
    gathered at a time, rank 0's copy broadcast into every shard of dst."""
    from deepspeed.runtime.zero import GatheredParameters

    src_params, dst_params = dict(src.named_parameters()), dict(dst.named_parameters())
    if src_params.keys() != dst_params.keys():
        raise RuntimeError("the reference's parameters differ from the policy's: "
                           f"{sorted(src_params.keys() ^ dst_params.keys())}")
    with torch.no_grad():
        for name, target in dst_params.items():
            with GatheredParameters([src_params[name]]), GatheredParameters([target], modifier_rank=0):
                target.data.copy_(src_params[name].data)
        # Buffers are never partitioned. zero.Init creates them in the model's dtype (RoPE's
        # inv_freq in bf16 would lose precision), so they are replaced, not copied into.
        for name, buffer in src.named_buffers():
            module_name, _, leaf = name.rpartition(".")
            dst.get_submodule(module_name)._buffers[leaf] = buffer.clone()
