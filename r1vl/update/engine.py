"""What turns losses into updates: backward, gradient reduction, clipping, the optimizer and
its schedule, and their state in a checkpoint.

    engine = make_engine(model, cfg, lr, total_steps, world)   # r1vl.update.engines: PlainEngine, or DeepSpeed's

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
from r1vl.config import Config


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
    def from_config(cls, cfg: Config, lr: float, total_steps: int) -> UpdateSettings:
        return cls(lr, total_steps, (cfg.adam_beta1, cfg.adam_beta2), cfg.weight_decay, cfg.warmup_steps,
                   cfg.lr_schedule, cfg.max_grad_norm, cfg.max_bad_steps)



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
    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
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
    """AdamW + LambdaLR on `model`'s trainable parameters, gradients summed over ranks by hand.

    Args:
        model: the policy (any nn.Module), already on its device, identical on every rank.
        settings: the rate, its schedule, AdamW's, clipping, the skip limit.
    """

    def __init__(self, model: torch.nn.Module, settings: UpdateSettings, world: distributed.Dist):
        self.model, self.world = model, world
        self.max_grad_norm = settings.max_grad_norm if settings.max_grad_norm > 0 else float("inf")
        self.max_bad_steps = settings.max_bad_steps
        self.skipped = 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = adamw_with_schedule(self.params, settings)

    # ------------------------------------------------------------------ the update

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate d(loss)/d(params); the loss is already weighted by its share of the
        global batch (r1vl.update.losses.microbatch_weight), so gradients sum, never average."""
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
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def forward(self, fn, *args, **kwargs):
        """fn(model, *args, **kwargs): a loss or log-probs of the policy (r1vl.update.losses)."""
        return fn(self.model, *args, **kwargs)

    def reference(self, model: torch.nn.Module | None = None) -> Frozen:
        """The KL reference, frozen: `model` (a copy the caller loaded, e.g. on resume) or,
        when None, a copy of the policy as it is now."""
        return Frozen(copy.deepcopy(self.model) if model is None else model)

    def gathered(self):
        """Context in which every parameter holds its full value (for the rollout); the
        weights are never sharded here."""
        return contextlib.nullcontext()

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    # ------------------------------------------------------------------ checkpoints

    def save_state(self, directory: Path) -> None:
        """Optimizer and schedule into `directory` (every rank calls this; the state is the
        same on every rank, so rank 0 writes it). The weights are saved by the caller."""
        if self.world.is_main:
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
            write_engine_json(directory, self.scheduler, self.skipped)

    def load_state(self, directory: Path) -> None:
        """Inverse of save_state; the optimizer file is read with torch.load(weights_only=True)."""
        if not (directory / "optimizer.pt").is_file():
            raise ValueError(f"{directory}: no optimizer.pt (written with --deepspeed?); resume with the same engine")
        state = torch.load(directory / "optimizer.pt", map_location=self.world.device, weights_only=True)
        self.optimizer.load_state_dict(state)
        self.skipped = read_engine_json(directory, self.scheduler)["skipped"]


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
