"""The reward functions a run trains on (`--reward_funcs`, `--reward_weights`): the built-ins
and the user's own, and the weighted total the advantages are computed from.

    specs = parse_reward_funcs(["steprar", "steprvr", "my_reward.py:fmt"], [1.0, 1.0, 0.5])
    total = weighted_total(per_function, weights)      # (N,) fp32, NaN where nobody had an opinion

A NAME is one of
  steprar, steprvr, accuracy     the built-ins, columns of r1vl.rewards.score's breakdown:
                                 StepRAR (accuracy + alpha x key-step match), StepRVR (1 for a
                                 complete, logically ordered solution), the answer check alone;
  path/to/file.py:function       a function in a Python file (relative to the working directory);
  package.module:function        a function in an importable module.

The default, steprar + steprvr with weights 1, is the paper's StepGRPO reward: the weighted sum
equals RewardBreakdown.total bit for bit (x * 1.0 is exact and a two-term sum does not depend
on its order). The paper's ablation (benchmarks/bench_ablation.py) is
  outcome only: accuracy;  +StepRAR: steprar;  +StepRVR: accuracy steprvr;  StepGRPO: the default.

A user's function has TRL's GRPOTrainer signature, so one written for TRL runs unchanged:
    fn(prompts, completions, completion_ids, **columns) -> list[float | None]
It runs in a worker process (r1vl.rewards.worker), never in the trainer's. None is "no
opinion" and becomes NaN; the total is the weighted nansum (TRL's `sum_then_normalize`), and a
completion every function left at None gets the advantage 0 (r1vl.rewards.advantages).
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BUILTINS = ("steprar", "steprvr", "accuracy")  # each a RewardBreakdown field of the same name
_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True)
class RewardSpec:
    """One entry of --reward_funcs."""

    text: str  # as given on the command line
    name: str  # logged as rewards/<name>: the built-in's or the function's name
    weight: float
    builtin: bool  # one of BUILTINS (scored in the trainer); else a user function (in the worker)
    path: str = ""  # the .py file's absolute path (file specs)
    module: str = ""  # the importable module (module specs)
    attr: str = ""  # the function's name in the file or module


def parse_reward_funcs(funcs: Sequence[str], weights: Sequence[float] = ()) -> list[RewardSpec]:
    """The specs of --reward_funcs with their --reward_weights (empty: all 1).

    Checks what can be checked without running the user's code: the syntax, that a file
    exists, the weights' count and values, no NAME twice. Importing the functions and
    checking that they are callable is the worker's job (RewardWorker.start), also at start-up.

    Raises:
        ValueError: naming the option and the entry.
    """
    if not funcs:
        raise ValueError("--reward_funcs needs at least one function")
    if weights and len(weights) != len(funcs):
        raise ValueError(f"--reward_weights has {len(weights)} value(s) for {len(funcs)} --reward_funcs "
                         f"({' '.join(funcs)}); give one weight per function, or none for all 1")
    for w in weights:
        if not math.isfinite(w):
            raise ValueError(f"--reward_weights must be finite numbers, got {w}")
    twice = sorted({f for f in funcs if list(funcs).count(f) > 1})
    if twice:
        raise ValueError(f"--reward_funcs lists {', '.join(twice)} more than once; give it once, with its weight")
    specs = [_spec(text, float(weights[i]) if weights else 1.0) for i, text in enumerate(funcs)]
    return _unique_names(specs)


def _spec(text: str, weight: float) -> RewardSpec:
    if text in BUILTINS:
        return RewardSpec(text, text, weight, builtin=True)
    target, sep, attr = text.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise ValueError(f"--reward_funcs {text}: expected one of {', '.join(BUILTINS)}, "
                         "path/to/file.py:function or package.module:function")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise ValueError(f"--reward_funcs {text}: no such file {target}")
        return RewardSpec(text, attr, weight, builtin=False, path=str(path.resolve()), attr=attr)
    if not _MODULE.match(target):
        raise ValueError(f"--reward_funcs {text}: {target!r} is neither a .py file nor a module name")
    return RewardSpec(text, attr, weight, builtin=False, module=target, attr=attr)


def _unique_names(specs: list[RewardSpec]) -> list[RewardSpec]:
    """Two functions of the same name (a.py:score, b.py:score) are logged as a.score, b.score."""
    names = [s.name for s in specs]
    out = []
    for s in specs:
        if names.count(s.name) > 1 and not s.builtin:
            where = Path(s.path).stem if s.path else s.module
            s = RewardSpec(s.text, f"{where}.{s.attr}", s.weight, s.builtin, s.path, s.module, s.attr)
        out.append(s)
    clash = sorted({s.name for s in out if [t.name for t in out].count(s.name) > 1})
    if clash:
        raise ValueError(f"--reward_funcs: two functions would both be logged as {clash[0]}; rename one")
    return out


def weighted_total(per_function: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N,) fp32: sum over functions of weight x reward, NaN (no opinion) counted as 0, and NaN
    where every function returned None (TRL's `unscorable` rows).

    per_function: (N, F) fp32, NaN where a function returned None. weights: (F,) fp32.
    """
    total = (per_function * weights.unsqueeze(0)).nansum(dim=1)
    total[torch.isnan(per_function).all(dim=1)] = torch.nan
    return total


def builtin_column(breakdown, name: str) -> np.ndarray:
    """(N,) fp32: the built-in `name`'s rewards from a RewardBreakdown."""
    return np.asarray(getattr(breakdown, {"steprar": "step_rar", "steprvr": "step_rvr"}.get(name, name)),
                      dtype=np.float32)
