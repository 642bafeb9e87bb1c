"""--reward_funcs over the built-ins: the paper's ablation settings sum the components they name,
the default is StepGRPO's reward bit for bit, and the advantages of unscorable completions
(every function returned None) are TRL's."""
import numpy as np
import pytest
import torch

from r1vl.config import make_config
from r1vl.rewards import RewardConfig, score
from r1vl.rewards.advantages import step_advantages
from r1vl.rewards.functions import builtin_column, parse_reward_funcs, weighted_total
from r1vl.run.setup import check_inputs


def _solution(answer: str, steps: list[str]) -> str:
    lines = ["### Image Description:", "Two bars.", "### Rationales:", "Compare them.",
             "### Let's think step by step."]
    for i, step in enumerate(steps, 1):
        lines += [f"### Step {i}:", step]
    return "\n".join(lines + ["### The final answer is:", answer])


class _Example:
    problem = "Which bar is taller?"
    solution = _solution("left", ["The left bar is 5 units tall.", "5 > 3, so the left bar is taller."])
    key_steps = (("left bar is 5 units",), ("5 > 3",))


def _trained(breakdown, funcs: list[str]) -> np.ndarray:
    specs = parse_reward_funcs(funcs)
    per_function = torch.stack([torch.from_numpy(builtin_column(breakdown, s.name)) for s in specs], dim=1)
    return weighted_total(per_function, torch.tensor([s.weight for s in specs])).numpy()


def test_each_ablation_setting_sums_its_components():
    completions = [
        _Example.solution,                                           # right, valid, both key steps
        _solution("right", ["The left bar is 5 units tall.", "no"]),  # wrong answer, one key step
        "left",                                                      # no structure, no answer line
        _solution("left", []),                                       # right answer, no steps
    ]
    b = score(completions, [_Example()] * len(completions), RewardConfig(alpha=0.1, symbolic=False))
    # The default is the paper's total, bit for bit (the built-in run's weights depend on it).
    default = _trained(b, list(make_config().reward.reward_funcs))
    assert default.dtype == np.float32 and default.tobytes() == b.total.tobytes()
    np.testing.assert_array_equal(_trained(b, ["accuracy"]), b.accuracy)
    np.testing.assert_allclose(_trained(b, ["steprar"]), b.accuracy + 0.1 * b.key_step_match * b.has_answer)
    np.testing.assert_array_equal(_trained(b, ["accuracy", "steprvr"]), (b.accuracy + b.step_rvr).astype(np.float32))
    # The cases differ where the settings should: the key steps count only in steprar.
    assert b.accuracy[0] == 1 and b.key_step_match[0] == 1 and b.step_rvr[0] == 1
    assert _trained(b, ["steprar"])[1] > _trained(b, ["accuracy"])[1] == 0


def test_default_equals_the_paper_total_on_many_values():
    """x * 1.0 + y * 1.0 == x + y in fp32 for any rewards, not just the few above."""
    g = torch.Generator().manual_seed(0)
    rar, rvr = torch.rand(4096, generator=g) * 1.1, (torch.rand(4096, generator=g) > 0.5).float()
    total = weighted_total(torch.stack([rar, rvr], dim=1), torch.ones(2))
    assert torch.equal(total, rar + rvr)


def test_options_are_checked():
    with pytest.raises(ValueError, match="--loss_softmax float64"):
        make_config(loss_softmax="float64", loss_type="dapo")
    with pytest.raises(ValueError, match="--reward_weights has 1 value"):  # at start-up, before the model
        check_inputs(make_config(reward_funcs=["steprar", "steprvr"], reward_weights=[0.5]))
    with pytest.raises(ValueError, match="--reward_funcs outcome: expected one of"):
        check_inputs(make_config(reward_funcs=["outcome"]))
    assert make_config().reward.reward_funcs == ("steprar", "steprvr") and make_config().reward.reward_weights == ()
    assert make_config(reward_funcs="accuracy", reward_weights=2).reward.reward_weights == (2.0,)
    assert make_config(attention="sdpa_masked").policy.attention == "sdpa_masked"


def _trl_advantages(rewards: torch.Tensor, G: int, scale: str) -> torch.Tensor:
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, sum_then_normalize, on the total."""
    from trl.trainer.utils import nanstd

    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
    std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G) if scale == "group" else \
        nanstd(rewards).expand_as(rewards)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_unscorable_completions_get_trl_advantages(scale):
    nan = float("nan")
    rewards = torch.tensor([1.0, nan, 0.0, 2.0,   nan, nan, nan, nan,   0.5, nan, nan, nan,   1.0, 0.0, 1.0, 0.0])
    ours = step_advantages(rewards, 4, scale, lambda values: values)
    torch.testing.assert_close(ours, _trl_advantages(rewards, 4, scale), rtol=1e-6, atol=1e-6)
    assert ours[1] == ours[4] == ours[8] == 0 and ours[2] != 0


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_without_nan_the_advantages_match_trl_too(scale):
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 0.5, 0.5, 0.5, 1.5])
    torch.testing.assert_close(step_advantages(rewards, 4, scale, lambda v: v), _trl_advantages(rewards, 4, scale))
