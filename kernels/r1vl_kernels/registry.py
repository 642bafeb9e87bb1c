"""The op registry: the torch.library namespace of the package's custom ops, the lookup the
public functions call them through, and what their fake kernels and autograd rules share.

Custom ops keep the kernels opaque to torch.compile (it does not trace into the launchers)
and give autograd a single node: forward = one sweep over the vocabulary (or over hidden x
weight) + the O(N) loss terms, backward = one more sweep writing the gradients.

The ops of the namespace `r1vl_kernels`, each registered (with its fake kernel and autograd
rule) by the module of its op family:

    terms    group_advantages
    logits   token_logprobs, grpo_loss_fwd, grpo_loss_bwd, grpo_loss_bwd_inplace,
             grpo_loss_one_sweep
    hidden   token_logprobs_from_hidden, grpo_loss_from_hidden_fwd, grpo_loss_from_hidden_bwd

Each op takes `impl` ("triton" or "torch"), which the public functions resolve
(options.resolve_impl).
"""
import inspect

import torch
from torch import Tensor

LIBRARY = "r1vl_kernels"


def op(name: str):
    """The registered operator `r1vl_kernels::name`, looked up at call time.

    Calls go through torch.ops rather than the CustomOpDef objects: with torch 2.13,
    calling grpo_loss_fwd through its CustomOpDef crashed in the dispatcher's argument
    parsing (std::bad_alloc, vector::reserve) in about one process in three once
    transformers had been imported afterwards; the same call through torch.ops never did in
    the same reproduction (tests/kernels/test_op_calls.py). The cause is not understood.
    """
    return getattr(getattr(torch.ops, LIBRARY), name).default


def fake_loss_outputs(like: Tensor, n: int, with_kl: bool, with_entropy: bool):
    """Empty outputs of a forward loss op's shapes (see logits.grpo_loss_fwd), for tracing
    (torch.compile)."""
    def vec(size):
        return like.new_empty(size, dtype=torch.float32)

    return (vec(()), vec(n), vec(n), vec(n), vec(n if with_kl else 0), vec(n if with_entropy else 0),
            vec(()), vec(()))


def named_inputs(fn, args, kwargs=None) -> dict:
    """An op's inputs by parameter name, so that the fake kernels and autograd rules never
    depend on the position of an argument."""
    return inspect.signature(fn).bind(*args, **(kwargs or {})).arguments


def input_grads(fn, **grads) -> tuple:
    """The tuple an autograd rule returns: the given gradients by name, None for the rest."""
    names = list(inspect.signature(fn).parameters)
    unknown = set(grads) - set(names)
    if unknown:
        raise TypeError(f"{fn.__name__} has no inputs named {sorted(unknown)}")
    return tuple(grads.get(name) for name in names)
