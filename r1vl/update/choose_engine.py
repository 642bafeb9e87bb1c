"""Which engine a stage trains with: the plain one, or DeepSpeed's with --deepspeed (imported
only then, so that plain runs never import deepspeed)."""
from __future__ import annotations

import torch

from r1vl import distributed
from r1vl.config import OptimizerOptions
from r1vl.deepspeed_config import read_deepspeed_config
from r1vl.update.engine import PlainEngine, UpdateSettings
from r1vl.update.packing import Sequence


def make_engine(model: torch.nn.Module, options: OptimizerOptions, lr: float, total_steps: int, world: distributed.Dist,
                idle: Sequence | None = None):
    """The engine that turns a stage's losses into updates: DeepSpeed's with --deepspeed,
    else plain data parallelism.

    lr: the stage's base rate; total_steps: the optimizer steps its schedule spans; idle: the
    one sequence an engine that keeps ranks in lockstep runs, weighted 0, on a rank
    with fewer micro-batches than another (a blank-image prompt; None: one is never needed).
    options: AdamW, its schedule, clipping, the skip limit and --deepspeed.
    """
    settings = UpdateSettings.from_options(options, lr, total_steps)
    if options.deepspeed:
        from r1vl.update.deepspeed_engine import DeepSpeedEngine

        # Checked against --dtype at start-up (r1vl.run.setup.check_inputs); the engine checks
        # it against the model's actual dtype.
        raw = read_deepspeed_config(options.deepspeed, "auto", options.max_grad_norm)
        return DeepSpeedEngine(model, settings, options.deepspeed, raw, world, idle)
    return PlainEngine(model, settings, world)
