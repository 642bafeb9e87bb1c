"""One StepGRPO update (r1vl.update.grpo.grpo_update) against an independent float64 full-batch
gradient (grpo_reference), and the advantages against values computed by hand.

The two-rank runs (tests/r1vl/update/grpo_worker.py under torchrun: plain data parallelism, ZeRO-2,
ZeRO-3, loss types grpo and dapo) inject fixed non-zero rewards, so every part of the loop's
wiring matters: each micro-batch's advantages, its share of the global batch, the global
token count of dapo, the zero-weighted idle batch, the sum over ranks, the KL reference.
Checked: the gradient norm the engine reports (before clipping, none here) equals the
reference's to rtol 1e-4; for plain data parallelism the summed gradient itself, element by
element; for every engine the weights after the update, which AdamW's first step moves by
-lr * sign(gradient) wherever the gradient is not tiny. Measured (two CPU ranks, float32):
gradient norms within 3e-7 relative, gradients within 2e-6 of their largest element, every
checked weight moved by -lr * sign to 2%.

Single process: the same update with the fused loss's Triton kernels under the Triton
interpreter, and with a bfloat16 policy (the GPU default) on the CPU.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1vl import distributed
from r1vl.rewards.advantages import step_advantages

ROOT = Path(__file__).resolve().parents[3]
RTOL = 1e-4


# -------------------------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 0.0])
    local = lambda values: [float(v) for v in values]  # noqa: E731  (one rank)
    eps = 1e-4
    # group: (r - group mean) / (unbiased group std + eps); std(1, 0) = sqrt(0.5), std(2, 0) = sqrt(2)
    a, b = 0.5 / (math.sqrt(0.5) + eps), 1.0 / (math.sqrt(2.0) + eps)
    torch.testing.assert_close(step_advantages(rewards, 2, "group", local),
                               torch.tensor([a, -a, 0.0, 0.0, b, -b]), rtol=1e-6, atol=0)
    # none (Dr. GRPO): centred only
    torch.testing.assert_close(step_advantages(rewards, 2, "none", local),
                               torch.tensor([0.5, -0.5, 0.0, 0.0, 1.0, -1.0]), rtol=0, atol=0)
    # batch: divided by the unbiased std of the whole step: mean 2/3, sum of squared
    # deviations 17/6, over 5 -> std sqrt(17/30)
    std = math.sqrt(17 / 30)
    torch.testing.assert_close(step_advantages(rewards, 2, "batch", local),
                               torch.tensor([0.5, -0.5, 0.0, 0.0, 1.0, -1.0]) / (std + eps), rtol=1e-6, atol=0)


def test_batch_advantages_use_every_ranks_rewards():
    """This rank holds the first two groups; another rank the third (count 2, sum 2, sum of
    squares 4). The std is that of all six rewards, not of this rank's four."""
    other = [2.0, 2.0, 4.0]
    over_ranks = lambda values: [float(v) + o for v, o in zip(values, other)]  # noqa: E731
    got = step_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), 2, "batch", over_ranks)
    torch.testing.assert_close(got, torch.tensor([0.5, -0.5, 0.0, 0.0]) / (math.sqrt(17 / 30) + 1e-4),
                               rtol=1e-6, atol=0)
    # A rank whose prompts were all skipped still takes part in the reduction.
    assert step_advantages(torch.zeros(0), 2, "batch", over_ranks).numel() == 0


# -------------------------------------------------------------------------------- the update


def _check_update(result: dict, reference: dict, initial: dict, lr: float, what: str) -> None:
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in reference.values()))
    assert abs(result["grad_norm"] - norm) <= RTOL * norm, (what, result["grad_norm"], norm)
    if result.get("grads"):
        assert result["grads"].keys() == reference.keys(), what
        for name, g in reference.items():
            torch.testing.assert_close(result["grads"][name].double(), g, rtol=0, atol=1e-5 * float(g.abs().max()),
                                       msg=f"{what} {name}")
    largest = max(float(g.abs().max()) for g in reference.values())
    checked = 0
    for name, g in reference.items():
        moved = (result["after"][name] - initial[name]).double()
        mask = g.abs() > 1e-3 * largest  # AdamW's first step: -lr * g / (|g| + 1e-8)
        checked += int(mask.sum())
        torch.testing.assert_close(moved[mask], -lr * torch.sign(g[mask]), rtol=0.02, atol=0, msg=f"{what} {name}")
    assert checked > 10_000, what


def test_update_on_two_ranks_matches_the_float64_full_batch_gradient(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "r1vl" / "update" / "grpo_worker.py"), str(tmp_path)]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    out = torch.load(tmp_path / "grpo_step.pt", weights_only=True)
    runs = json.loads((tmp_path / "done.json").read_text())["runs"]
    assert runs == ["plain-grpo", "plain-dapo", "zero2-grpo", "zero3-dapo"]
    for run in runs:
        assert (out[run]["sequences"], out[run]["tokens"]) == (8, 33), run  # both ranks' completions
        _check_update(out[run], out[f"reference-{run.split('-')[1]}"], out["initial"], out["lr"], run)
    assert out["plain-grpo"]["grads"]  # the element-wise comparison ran


@pytest.mark.parametrize("impl, dtype, fillers", [("triton", torch.float32, 0), ("torch", torch.bfloat16, 0),
                                                  ("torch", torch.float32, 2)])
def test_update_with_the_triton_interpreter_and_in_bfloat16(impl, dtype, fillers):
    """One process holds all four prompts (three micro-batches). Triton (interpreted on the
    CPU, tests/conftest.py) must match the reference as the torch path does; bfloat16 is
    compared by the direction and size of the whole gradient (its rounding is about 1%).
    fillers: the engine pads the micro-batches with that many zero-weighted idle batches, as
    a rank with fewer micro-batches than another would run them: they change nothing (their
    KL term alone would move the gradient if they were weighted)."""
    import copy

    sys.path.insert(0, str(ROOT / "tests" / "r1vl" / "update"))
    from grpo_worker import BETA, LR, TEMPERATURE, capture_gradients, reference_gradient, setup

    from r1vl.config import make_config
    from r1vl.update.choose_engine import make_engine
    from r1vl.update.grpo import grpo_update
    from r1vl.update.microbatches import Batch, MicroBatch
    from r1vl.update.packing import pack

    if impl == "triton":
        assert os.environ.get("TRITON_INTERPRET") == "1"
    initial, ref_model, sequences, idle = setup()
    rewards = torch.tensor([1.0, 0.0, 0.3, 1.2, 2.1, 0.4, 0.0, 1.1])  # grpo_worker.REWARDS, ranks 0 then 1
    everything = sequences[0] + sequences[1]
    cfg = make_config(model="tiny", lr=LR, max_grad_norm=0.0, dtype="float32", device="cpu", loss_type="grpo",
                      temperature=TEMPERATURE, beta=BETA, num_iterations=1, max_completion_length=8)
    world = distributed.Dist(0, 1, 0, torch.device("cpu"))
    model = copy.deepcopy(initial).to(dtype)
    engine = make_engine(model, cfg.optimizer, LR, 1, world)
    if fillers:
        idle_batch = pack([idle], model)
        engine.lockstep = lambda micro: micro + [(None, idle_batch)] * fillers
    grads = capture_gradients(engine, model)
    reference = engine.reference(copy.deepcopy(ref_model).to(dtype))
    advantages = step_advantages(rewards, 2, "group", lambda v: [float(x) for x in v])
    micro = [MicroBatch(idx, pack([everything[i] for i in idx], model), advantages[idx])
             for idx in ([0, 1, 2, 3], [4, 5], [6, 7])]
    update = grpo_update(engine, reference, Batch(everything, micro, 0), cfg.objective, cfg.sampling, impl, world)
    expected = reference_gradient(initial, ref_model, sequences, "grpo")
    if dtype == torch.float32:
        _check_update({"grad_norm": update["grad_norm"], "grads": grads,
                       "after": dict(model.named_parameters())}, expected, dict(initial.named_parameters()), LR, impl)
        return
    got = torch.cat([grads[n].double().flatten() for n in expected])
    want = torch.cat([g.flatten() for g in expected.values()])
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.995
    assert abs(got.norm() - want.norm()) < 0.03 * want.norm()
    assert math.isfinite(update["loss"]) and math.isfinite(update["entropy"])
