"""StepRAR / StepRVR / accuracy for batches against hand-computed values (docs/method.md)."""
import time

import numpy as np
import pytest
from reward_cases import EXAMPLE, KEY_STEPS, NO_SYMBOLIC, SOLUTION, Ex, completion, step_rar, total_reward

from r1vl.rewards import RewardConfig, normalize_math, score, score_groups


def test_step_rar_values():
    k = 0.5
    assert step_rar(SOLUTION, EXAMPLE, NO_SYMBOLIC) == pytest.approx(1 + 0.1 * k)
    wrong = completion(answer="7")
    assert step_rar(wrong, EXAMPLE, NO_SYMBOLIC) == pytest.approx(0.1 * k)
    # No answer section: 0 by the paper's rule (the authors' code paid 0.1 k here).
    no_answer = SOLUTION.split("### The final answer is:")[0]
    assert step_rar(no_answer, EXAMPLE, NO_SYMBOLIC) == 0.0
    assert step_rar(SOLUTION, EXAMPLE, RewardConfig(alpha=0.5, symbolic=False)) == pytest.approx(1.25)


def test_empty_answer_line_is_no_answer():
    empty = completion(answer="   \n\n")
    assert step_rar(empty, EXAMPLE, NO_SYMBOLIC) == 0.0
    b = score([empty], [EXAMPLE], NO_SYMBOLIC)
    assert not b.has_answer[0] and b.step_rvr[0] == 1.0 and b.total[0] == pytest.approx(1.0)


def test_answer_before_last_step():
    text = ("### Image Description:\nd\n### Rationales:\nr\n### Step 1:\nBD = 12/2 = 6\n"
            "### The final answer is:\n6\n### Step 2:\nSo x = 6.")
    b = score([text], [EXAMPLE], NO_SYMBOLIC)
    assert b.step_rvr[0] == 0.0
    assert b.accuracy[0] == 1.0  # the answer still counts for StepRAR


def test_multiple_final_answers_judged_on_the_first():
    hedge = completion(answer="7") + "\n### The final answer is:\n6"
    b = score([hedge], [EXAMPLE], NO_SYMBOLIC)
    assert (b.accuracy[0], b.step_rvr[0]) == (0.0, 0.0)


def test_total_reward_maximum_and_minimum(verifier):
    full = Ex(SOLUTION, ("bd", ["x = 6"]))
    assert total_reward(SOLUTION, full, verifier=verifier) == pytest.approx(2.1)
    assert total_reward("", full, verifier=verifier) == 0.0


def test_score_breakdown_shapes_and_values(verifier):
    texts = [SOLUTION, completion(answer="7"), "garbage", completion(answer="6.0")]
    b = score(texts, [EXAMPLE] * 4, verifier=verifier)
    np.testing.assert_allclose(b.accuracy, [1, 0, 0, 1])
    np.testing.assert_allclose(b.key_step_match, [0.5, 0.5, 0, 0.5])
    np.testing.assert_allclose(b.step_rar, [1.05, 0.05, 0, 1.05], rtol=1e-6)
    np.testing.assert_allclose(b.step_rvr, [1, 1, 0, 1])
    np.testing.assert_allclose(b.total, b.step_rar + b.step_rvr)
    assert b.has_answer.tolist() == [True, True, False, True]
    assert b.undecided.tolist() == [False] * 4
    assert b.total.dtype == np.float32 and b.has_answer.dtype == bool and len(b) == 4


def test_score_checks_alignment():
    with pytest.raises(ValueError, match="3 completions but 1 examples"):
        score([SOLUTION] * 3, [EXAMPLE])
    with pytest.raises(TypeError, match=r"completions\[1\]"):
        score([SOLUTION, None], [EXAMPLE, EXAMPLE])


def test_score_groups_repeats_each_example_once_per_completion():
    a, b = Ex(completion(answer="1")), Ex(completion(answer="2"))
    groups = [[completion(answer="1"), completion(answer="2")],
              [completion(answer="2"), completion(answer="2")]]
    r = score_groups(groups, [a, b], NO_SYMBOLIC)
    # Prompt-major: entry p*G + g is completion g of prompt p against example p.
    assert r.accuracy.tolist() == [1.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="2 groups of completions but 1 examples"):
        score_groups(groups, [a], NO_SYMBOLIC)
    with pytest.raises(ValueError, match="differ in size"):
        score_groups([["x"], ["x", "y"]], [a, b], NO_SYMBOLIC)


def test_reward_config_checks_alpha():
    with pytest.raises(ValueError, match="alpha"):
        RewardConfig(alpha=-0.1)


# --------------------------------------------------------------------------- untrusted input

MB = 1 << 20
ADVERSARIAL = {
    "junk": "x" * MB,
    "step_headers": "### Step 1:" * (MB // 11),
    "step_digits": "### Step " + "1" * MB,
    "newline_hashes": "### Step 1:\n" + "\n##" * (MB // 3),
    "whitespace_answer": SOLUTION.replace("\n6", "") + " " * MB,
    "digits": "1" * MB,
    "decimals": "1." * (MB // 2),
    "commas": "1," * (MB // 2),
    "fracs": "\\frac{" * (MB // 6),
    "spaces_then_symbol": " " * MB + "=",
    "braces": completion(answer="{" * 10_000 + "1" + "}" * 10_000),
    "huge_answer": completion(answer="9" * MB),
    "many_steps": completion(steps=["x = 6"] * 20_000),
    "long_answer_line": completion(answer="6 (" + "because " * (MB // 8) + ")"),
}


def _bounded(fn, cpu_s=1.0, wall_s=4.0):
    """Run fn; its CPU time must stay under cpu_s (a quadratic regex on 1 MB would take
    minutes) and its wall time under wall_s (looser: the test machine may be busy)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert cpu < cpu_s and wall < wall_s, (cpu, wall)
    return result


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_completions_are_fast(name, verifier):
    text = ADVERSARIAL[name]
    example = Ex(SOLUTION, KEY_STEPS + (["x = 6", "x=6"],))
    for config in (RewardConfig(), RewardConfig(normalize=True)):
        b = _bounded(lambda: score([text], [example], config, verifier))
        assert 0.0 <= b.total[0] <= 2.1 + 1e-6


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_step_bodies_are_fast_when_normalized(name):
    # Inside a step body the text reaches the normalizer and every key-step search.
    text = completion(steps=(ADVERSARIAL[name], "x = 6"))
    _bounded(lambda: normalize_math(ADVERSARIAL[name]))
    _bounded(lambda: score([text], [Ex(SOLUTION, KEY_STEPS)], RewardConfig(normalize=True, symbolic=False)))
