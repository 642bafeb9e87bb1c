"""What turns losses into updates: backward, gradient reduction, clipping, the optimizer and
its schedule, and their state in a checkpoint.

    engine = make_engine(model, cfg.optimizer, lr, total_steps, world)   # r1vl.update.choose_engine: PlainEngine, or DeepSpeed's

The update talks to an engine only:

    steps = engine.lockstep(micro)              # the micro-batches this rank runs
    out = engine.forward(policy_loss, packed, ...)  # fn(model, ...) as the model's forward
    engine.backward(loss)                       # once per micro-batch
    grad_norm = engine.step(finite)             # once per optimizer step
    with engine.gathered(): ...                 # full weights for the rollout (a no-op unless sharded)
    reference = engine.reference()              # the KL reference: the policy as it is now, frozen
    engine.close()                              # end of a stage

`PlainEngine` is torch's AdamW with a warm-up/decay schedule and data parallelism by hand
(gradients summed over ranks once per step, r1vl.distributed). `r1vl.update.deepspeed_engine`
puts DeepSpeed's engine (ZeRO-2/3) behind the same methods.

Mixed precision (a bf16 policy, `--dtype auto` on CUDA): the weights stay bf16 and the
optimizer steps an fp32 master copy of each of them. AdamW straight on bf16 weights loses
most updates to rounding (an update below half a bf16 step, 2**-9 relative, rounds away:
RMSNorm weights near 1.0 never move at lr 2e-5); on the masters it keeps every bit, as
DeepSpeed's bf16 optimizer does. Per step:

    backward   each bf16 gradient is added into its master's fp32 .grad as soon as autograd
               has accumulated it (a post-accumulate-grad hook), then freed: micro-batches
               accumulate in fp32, and no bf16 .grad outlives its hook
    step       the fp32 gradients summed over ranks, clipped, AdamW on the masters (fp32
               moments), each weight set to its master rounded to nearest

Masters rather than fp32 weights under autocast: everything else that reads the policy
(the rollout's decode step, its CUDA graphs and fused weights, the KL reference, the fused
loss on the lm_head weight, the saved policy) keeps reading bf16 weights that exist once,
instead of casting fp32 weights on every forward. The cost is 4 bytes per trainable
parameter for the masters, 8 for AdamW's moments (fp32, as the masters are), and fp32
gradients (4 instead of 2). fp32 weights (the CPU default) have no masters: AdamW steps
them in place, exactly as without mixed precision. float16 gets masters too, but no loss
scaling: bf16 is the low precision to train in.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from r1vl import distributed
from r1vl.config import OptimizerOptions
from r1vl.model.lora import adapters_off, has_adapters


@dataclass(frozen=True)
class UpdateSettings:
    """What an engine needs of the options: AdamW, its schedule, clipping, the skip limit."""

    lr: float  # the base rate of this stage
    total_steps: int  # optimizer steps the schedule spans
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant / linear / cosine
    max_grad_norm: float = 1.0  # 0 = no clipping
    max_bad_steps: int = 3

    @classmethod
    def from_options(cls, options: OptimizerOptions, lr: float, total_steps: int) -> UpdateSettings:
        return cls(lr, total_steps, (options.adam_beta1, options.adam_beta2), options.weight_decay,
                   options.warmup_steps, options.lr_schedule, options.max_grad_norm, options.max_bad_steps)



def lr_factor(settings: UpdateSettings):
    """step -> multiplier of the base rate: linear warm-up over warmup_steps, then constant,
    linear or cosine decay to zero at total_steps."""
    warmup, total = settings.warmup_steps, settings.total_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if settings.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if settings.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor


def adamw_with_schedule(params: list[torch.nn.Parameter], settings: UpdateSettings):
    """(AdamW over `params`, its LambdaLR warm-up/decay schedule): every engine's update rule."""
    # On CUDA the fused step: torch's default there (foreach) computes exp_avg_sq.sqrt() for
    # every parameter at once, a temporary of 4 bytes per trainable parameter at the peak
    # (8 GiB at 2B). On the CPU torch's default, unchanged (the built-in run bit for bit).
    fused = True if params and all(p.device.type == "cuda" for p in params) else None
    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay,
                                  fused=fused)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(settings))


class NonFiniteUpdates(RuntimeError):
    """Too many updates skipped for a non-finite loss or gradient (--max_bad_steps)."""


class Frozen:
    """A frozen copy of a model (the KL reference). `forward(fn, *args)` is fn(model, *args)
    without gradient, the same call as Engine.forward."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)

    def close(self) -> None:
        self.model = None


class AdaptersOff:
    """The KL reference of a LoRA policy: the policy itself with its adapters switched off
    (peft's disable_adapter, r1vl.model.lora), run by the policy's own engine (so ZeRO-3
    gathers its shards as for the policy): no second copy of the weights. `forward(fn, *args)`
    as Frozen's."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @torch.no_grad()
    def forward(self, fn, *args, **kwargs):
        with adapters_off(self.engine.model):
            return self.engine.forward(fn, *args, **kwargs)

    def close(self) -> None:
        self.engine = None


class Engine:
    """What every engine shares: counting skipped updates, the rate, the defaults of the
    methods that only sharded engines need."""

    max_bad_steps: int
    skipped: int
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def _skip(self, norm: float) -> None:
        self.skipped += 1
        distributed.print0(f"skipped an update: non-finite loss or gradient (norm {norm}); "
                           f"{self.skipped} of at most {self.max_bad_steps}")
        if self.skipped >= self.max_bad_steps:
            raise NonFiniteUpdates(f"{self.skipped} updates skipped for non-finite values (--max_bad_steps); stopping")

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def lockstep(self, microbatches: list) -> list:
        """The micro-batches this rank runs in this step: `microbatches` itself. Engines with
        collectives inside every forward/backward (ZeRO) pad it with (None, idle batch)
        entries so that all ranks run as many; an entry whose key is None is weighted 0.

        microbatches: [(key, PackedBatch)], key anything but None.
        """
        return microbatches

    def close(self) -> None:
        """End of a stage: release what the engine holds (the model stays as it is)."""


class PlainEngine(Engine):
    """AdamW + LambdaLR on `model`'s trainable parameters, gradients summed over ranks by hand;
    an fp32 master copy of every trainable parameter that is not fp32 (see the module's
    docstring).

    Args:
        model: the policy (any nn.Module), already on its device, identical on every rank.
            Only one live engine per model: the next one is made after close().
        settings: the rate, its schedule, AdamW's, clipping, the skip limit.

    Attributes:
        params: what AdamW steps, one per trainable parameter in model order: the parameter
            itself when fp32, else its master.
        masters: {name: fp32 master} of the trainable parameters that are not fp32.
    """

    def __init__(self, model: torch.nn.Module, settings: UpdateSettings, world: distributed.Dist):
        self.model, self.world = model, world
        self.max_grad_norm = settings.max_grad_norm if settings.max_grad_norm > 0 else float("inf")
        self.max_bad_steps = settings.max_bad_steps
        self.skipped = 0
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.masters = {name: torch.nn.Parameter(p.detach().float()) for name, p in trainable
                        if p.dtype != torch.float32}
        self.params = [self.masters.get(name, p) for name, p in trainable]
        self._low = [(p, self.masters[name]) for name, p in trainable if name in self.masters]
        self._hooks = [p.register_post_accumulate_grad_hook(_into_master(master)) for p, master in self._low]
        self.optimizer, self.scheduler = adamw_with_schedule(self.params, settings)

    # ------------------------------------------------------------------ the update

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate d(loss)/d(params); the loss is already weighted by its share of the
        global batch (r1vl.update.losses.microbatch_weight), so gradients sum, never average.
        A parameter with a master accumulates in the master's fp32 .grad, never its own."""
        loss.backward()

    def step(self, loss_finite: bool) -> float:
        """Sum gradients over ranks, clip, step; or skip the step on every rank when any rank
        saw a non-finite loss or the summed gradient is not finite. Returns the gradient norm
        before clipping. Raises NonFiniteUpdates after max_bad_steps skipped updates."""
        distributed.all_reduce_grads(self.params)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        any_bad = distributed.all_reduce_max([0.0 if loss_finite else 1.0], self.world.device)[0] > 0
        # Every rank holds the same summed gradient and flag, so they all take the same decision.
        if any_bad or not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            self._skip(float(norm))
            return float(norm)
        self.optimizer.step()
        self._masters_to_weights()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @torch.no_grad()
    def _masters_to_weights(self) -> None:
        """Every low-precision weight := its master rounded to nearest (copy_ rounds)."""
        for p, master in self._low:
            p.copy_(master)

    def forward(self, fn, *args, **kwargs):
        """fn(model, *args, **kwargs): a loss or log-probs of the policy (r1vl.update.losses)."""
        return fn(self.model, *args, **kwargs)

    def reference(self, model: torch.nn.Module | None = None) -> Frozen:
        """The KL reference, frozen: `model` (a copy the caller loaded, e.g. on resume) or,
        when None, a copy of the policy as it is now (a deep copy takes no hooks along); with
        LoRA, the policy with its adapters off (AdaptersOff)."""
        if model is None and has_adapters(self.model):
            return AdaptersOff(self)
        return Frozen(copy.deepcopy(self.model) if model is None else model)

    def gathered(self):
        """Context in which every parameter holds its full value (for the rollout); the
        weights are never sharded here."""
        return contextlib.nullcontext()

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def close(self) -> None:
        """End of a stage: the gradient hooks removed from the model, so that the next
        engine on it gets the gradients; the masters and AdamW state go with this object."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ------------------------------------------------------------------ checkpoints

    def save_state(self, directory: Path) -> None:
        """Optimizer and schedule into `directory`, and the fp32 masters (master_weights.pt,
        {name: tensor}) when there are any: the saved policy holds only their rounding.
        Every rank calls this; the state is the same on every rank, so rank 0 writes it.
        The weights are saved by the caller."""
        if self.world.is_main:
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
            if self.masters:
                torch.save({name: m.detach() for name, m in self.masters.items()}, directory / MASTERS_FILE)
            write_engine_json(directory, self.scheduler, self.skipped)

    def load_state(self, directory: Path) -> None:
        """Inverse of save_state, after the caller loaded the policy; files are read with
        torch.load(weights_only=True). Saved masters replace the weights they belong to
        (this engine's masters, or the fp32 weights of a run resumed in fp32); without
        them (a checkpoint of an fp32 run) the masters are the loaded weights."""
        if not (directory / "optimizer.pt").is_file():
            raise ValueError(f"{directory}: no optimizer.pt (written with --deepspeed?); resume with the same engine")
        # To the CPU, as torch's own loading does: load_state_dict moves each moment to its
        # parameter's device but leaves AdamW's `step` where it was loaded, and a `step` on the
        # GPU is read back (.item()) once per parameter per step, a sync each time.
        state = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state)
        if (directory / MASTERS_FILE).is_file():
            # Copied into the masters one by one: no second set of them on the device.
            self._load_masters(torch.load(directory / MASTERS_FILE, map_location="cpu", weights_only=True), directory)
        self.skipped = read_engine_json(directory, self.scheduler)["skipped"]

    @torch.no_grad()
    def _load_masters(self, saved: dict[str, torch.Tensor], directory: Path) -> None:
        trainable = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        unknown = sorted(set(saved) - set(trainable))
        if unknown:
            raise ValueError(f"{directory / MASTERS_FILE}: master weights of parameters this run does not train: "
                             f"{unknown[:3]}{' ...' if len(unknown) > 3 else ''}")
        for name, value in saved.items():
            self.masters.get(name, trainable[name]).copy_(value)
        self._masters_to_weights()


MASTERS_FILE = "master_weights.pt"


def _into_master(master: torch.nn.Parameter):
    """The post-accumulate-grad hook of a low-precision parameter: its gradient, just
    accumulated by autograd, added into `master`'s fp32 .grad and freed."""
    def hook(param: torch.Tensor) -> None:
        if master.grad is None:
            master.grad = param.grad.float()
        else:
            master.grad.add_(param.grad)  # in place in fp32: the sum is never rounded to bf16
        param.grad = None
    return hook


def write_engine_json(directory: Path, scheduler, skipped: int, **extra) -> None:
    """engine.json: the schedule's state, the skipped-update count and an engine's `extra`
    (rank 0 writes it; JSON keeps it out of pickle)."""
    state = {"scheduler": _jsonable_scheduler_state(scheduler), "skipped": skipped, **extra}
    (directory / "engine.json").write_text(json.dumps(state, indent=1) + "\n")


def read_engine_json(directory: Path, scheduler=None) -> dict:
    """engine.json as write_engine_json wrote it; restores `scheduler`'s state when given."""
    state = json.loads((directory / "engine.json").read_text())
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state


def _jsonable_scheduler_state(scheduler) -> dict:
    """LambdaLR's state is numbers and lists of numbers (lr_lambdas holds None for plain
    functions, which are rebuilt from the config); JSON keeps it out of pickle."""
    state = scheduler.state_dict()
    if any(x is not None for x in state.get("lr_lambdas", [])):
        raise TypeError("the schedule holds a callable object; it cannot be saved as JSON")
    json.dumps(state)  # fail here, not on load, if anything is not plain data
    return state
