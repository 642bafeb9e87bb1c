"""--rewards: which of StepGRPO's reward components the advantages are computed from."""
import numpy as np
import pytest

from r1vl.config import make_config
from r1vl.rewards import RewardConfig, score
from r1vl.rewards.advantages import REWARD_SETS
from r1vl.rewards.advantages import trained_reward


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


def test_each_choice_sums_its_components():
    completions = [
        _Example.solution,                                           # right, valid, both key steps
        _solution("right", ["The left bar is 5 units tall.", "no"]),  # wrong answer, one key step
        "left",                                                      # no structure, no answer line
        _solution("left", []),                                       # right answer, no steps
    ]
    b = score(completions, [_Example()] * len(completions), RewardConfig(alpha=0.1, symbolic=False))
    np.testing.assert_allclose(trained_reward(b, "all"), b.step_rar + b.step_rvr)
    np.testing.assert_allclose(trained_reward(b, "accuracy"), b.accuracy)
    np.testing.assert_allclose(trained_reward(b, "steprar"), b.accuracy + 0.1 * b.key_step_match * b.has_answer)
    np.testing.assert_allclose(trained_reward(b, "steprvr"), b.accuracy + b.step_rvr)
    # The cases differ where the choices should: the key steps count only in steprar / all.
    assert b.accuracy[0] == 1 and b.key_step_match[0] == 1 and b.step_rvr[0] == 1
    assert trained_reward(b, "steprar")[1] > trained_reward(b, "accuracy")[1] == 0
    for name in REWARD_SETS:
        assert trained_reward(b, name).dtype == np.float32 and trained_reward(b, name).shape == (4,)


def test_unknown_choice_is_refused():
    with pytest.raises(ValueError, match="rewards must be one of"):
        trained_reward(score(["x"], [_Example()], RewardConfig(symbolic=False)), "format")
    with pytest.raises(ValueError, match="--rewards must be one of"):
        make_config(rewards="outcome")
    with pytest.raises(ValueError, match="--loss_softmax float64"):
        make_config(loss_softmax="float64", loss_type="dapo")
    assert make_config().reward.rewards == "all"
    assert make_config(attention="sdpa_masked").policy.attention == "sdpa_masked"
