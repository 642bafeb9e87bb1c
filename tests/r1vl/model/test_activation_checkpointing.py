"""--activation_checkpointing changes no number: log-probs, the fused GRPO loss (from hidden
states) and every parameter's gradient are equal with and without it, packed and with shared
prompts, for both model families; so are the weights after several plain-engine updates. CPU,
fp32: the recompute runs the same kernels on the same inputs, so equality is exact."""
import copy
import types

import pytest
import torch
from tiny_qwen_vl import FAMILIES, grpo_batch, tiny_model

from r1vl import distributed
from r1vl.model.activation_checkpointing import checkpointed_layers, enable_activation_checkpointing
from r1vl.model.attention import use_varlen_attention
from r1vl.update.engine import PlainEngine, UpdateSettings
from r1vl.update.losses import completion_logprobs, policy_loss
from r1vl.update.packing import pack

LOSS = dict(temperature=1.2, beta=0.04, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo", max_completion_length=16)


def _pair(family: str, seed: int = 0):
    plain = tiny_model(family, seed)
    use_varlen_attention(plain)
    checkpointed = copy.deepcopy(plain)
    n = enable_activation_checkpointing(checkpointed)
    assert n == len(checkpointed_layers(plain)) >= 3  # text layers and vision blocks
    return plain, checkpointed


def _loss(model, packed, advantages, ref_logp):
    model.train()
    return policy_loss(model, packed, advantages, None, ref_logp, impl="torch", **LOSS)


class _CountRecompute:
    """Counts the calls of the checkpointed layers' MLPs: the recompute runs the layer's
    forward again (transformers checkpoints `forward`, so the layer's own hooks fire once,
    its submodules' twice)."""

    def __init__(self, model):
        self.calls = 0
        self.handles = [m.mlp.register_forward_pre_hook(self._hook) for m in checkpointed_layers(model)]

    def _hook(self, module, args):
        self.calls += 1

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("share_prompts", [False, True])
def test_loss_logprobs_and_every_gradient_are_unchanged(family, share_prompts):
    plain, checkpointed = _pair(family)
    sequences = grpo_batch(seed=3, G=4, family=family)
    packed = pack(sequences, plain, share_prompts=share_prompts)
    assert packed.shares_prompts == share_prompts
    gen = torch.Generator().manual_seed(1)
    advantages = torch.randn(len(sequences), generator=gen)
    ref_logp = completion_logprobs(plain, packed, LOSS["temperature"], "torch") - 0.01

    logp = completion_logprobs(plain, packed, LOSS["temperature"], "torch")
    assert torch.equal(logp, completion_logprobs(checkpointed.train(), packed, LOSS["temperature"], "torch"))

    out_plain = _loss(plain, packed, advantages, ref_logp)
    counter = _CountRecompute(checkpointed)
    out_ckpt = _loss(checkpointed, packed, advantages, ref_logp)
    forward_calls = counter.calls
    out_plain.loss.backward()
    out_ckpt.loss.backward()
    counter.remove()
    assert counter.calls == 2 * forward_calls  # every layer was recomputed in backward
    assert torch.equal(out_plain.loss, out_ckpt.loss)
    assert torch.equal(out_plain.logp, out_ckpt.logp)
    grads = {n: p.grad for n, p in checkpointed.named_parameters()}
    for name, p in plain.named_parameters():
        assert p.grad is not None and grads[name] is not None, name
        assert torch.equal(p.grad, grads[name]), f"{name}: max diff {(p.grad - grads[name]).abs().max()}"


def test_no_grad_forwards_and_eval_mode_are_not_checkpointed():
    """The rollout, the old/reference log-probs and a frozen copy run no checkpoint."""
    _, checkpointed = _pair("qwen2_vl")
    packed = pack(grpo_batch(seed=1, G=2), checkpointed, share_prompts=True)
    counter = _CountRecompute(checkpointed)
    checkpointed.train()
    completion_logprobs(checkpointed, packed, 1.0, "torch")  # no_grad: each layer runs once
    calls = counter.calls
    out = policy_loss(checkpointed.eval(), packed, torch.ones(packed.num_sequences), None, None, impl="torch",
                      **{**LOSS, "beta": 0.0})
    out.loss.backward()  # eval mode: nothing is recomputed either
    assert calls == len(checkpointed_layers(checkpointed))
    assert counter.calls == 2 * calls
    counter.remove()


def test_plain_engine_updates_give_the_same_weights():
    plain, checkpointed = _pair("qwen2_vl", seed=5)
    world = types.SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), is_main=True)
    settings = UpdateSettings(lr=1e-3, total_steps=3)
    engines = [PlainEngine(m, settings, world) for m in (plain, checkpointed)]
    for step in range(3):
        sequences = grpo_batch(seed=10 + step, G=3)
        packed = pack(sequences, plain, share_prompts=True)
        advantages = torch.randn(len(sequences), generator=torch.Generator().manual_seed(step))
        for engine in engines:
            engine.train()
            out = engine.forward(policy_loss, packed, advantages, None, None, impl="torch",
                                 **{**LOSS, "beta": 0.0})
            engine.backward(out.loss)
            engine.step(True)
    assert distributed.weight_digests(plain) == distributed.weight_digests(checkpointed)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.equal(a, b), name
