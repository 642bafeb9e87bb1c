"""References to process groups that outlive destroy_process_group, dropped at teardown.

torch's destroy_process_group unregisters a group; its backend (gloo: a socket thread and two
worker threads per group) is freed only when the last Python reference to the group goes.
Some references last for the life of the process:

- Default arguments `group=<the world group>` evaluated when their module is imported:
  torch.distributed.nn.functional (all_reduce, broadcast, ... : `group=group.WORLD`) and
  deepspeed.comm.torch.TorchBackend.barrier / monitored_barrier
  (`group=torch.distributed.GroupMember.WORLD`). r1vl starts the process group first
  (distributed.init) and imports deepspeed, which imports both, when an engine is built, so
  these defaults hold the world group: a dozen references no destroy call removes (in
  __defaults__ tuples, which the garbage collector does not even track). Every one of these
  functions reads group=None as the world group at call time, so None is the same default.
- ZeRO-3's DeepSpeedZeRoOffload appends the module it wraps to the module-global list
  deepspeed.runtime.zero.parameter_offload.FWD_MODULE_STACK and never takes it off, not even
  in engine.destroy(): the module's hooks close over the engine, the engine over its ZeRO
  optimizer and their groups (forget_module).

Left there, those groups are freed during interpreter finalization, or never, with their gloo
threads running while the interpreter tears itself down (r1vl.distributed._free_process_groups).
Nothing here imports torch.distributed.nn or deepspeed: only modules already loaded are touched.
"""
from __future__ import annotations

import sys

import torch

# (module, class or None): whose functions may hold the world group as a default argument
_HOLDERS = (("torch.distributed.nn.functional", None), ("deepspeed.comm.torch", "TorchBackend"))


def release_group_defaults() -> int:
    """Replace every ProcessGroup default argument of the functions of _HOLDERS (those
    imported) with None, which they read as the world group. Returns how many were replaced."""
    if not torch.distributed.is_available():
        return 0
    group_type = torch.distributed.ProcessGroup
    replaced = 0
    for module_name, class_name in _HOLDERS:
        owner = sys.modules.get(module_name)
        if owner is not None and class_name is not None:
            owner = getattr(owner, class_name, None)
        if owner is None:
            continue
        for fn in list(vars(owner).values()):
            defaults = getattr(fn, "__defaults__", None)
            if defaults and any(isinstance(d, group_type) for d in defaults):
                replaced += sum(isinstance(d, group_type) for d in defaults)
                fn.__defaults__ = tuple(None if isinstance(d, group_type) else d for d in defaults)
    return replaced


def forget_module(module: torch.nn.Module) -> None:
    """Take `module` (the one a closed ZeRO-3 engine wrapped) off DeepSpeed's module-global
    forward stack, where it would keep the engine and its process groups alive."""
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    stack = getattr(offload, "FWD_MODULE_STACK", None)
    if stack is not None:
        stack[:] = [m for m in stack if m is not module]
