"""StepRAR / StepRVR / answer accuracy against hand-computed values (METHOD.md's rules)."""
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from r1vl.rewards import (
    RewardConfig,
    SymbolicVerifier,
    final_answer,
    key_step_match,
    normalize_math,
    reference_answer,
    score,
    score_groups,
    step_rvr,
    step_text,
)


def _one(field: str, text: str, example, config=RewardConfig(), verifier=None) -> float:
    """One completion's `field` of the batch score (accuracy, step_rar, total, ...)."""
    return float(getattr(score([text], [example], config, verifier), field)[0])


@dataclass(frozen=True)
class Ex:
    solution: str
    key_steps: tuple = ()


def completion(steps=("BD = 12/2 = 6", "So x = 6."), answer="6", *, description="A triangle ABC.",
               rationale="AD is a median of BC.", numbers=None, tail=""):
    numbers = numbers or range(1, len(steps) + 1)
    parts = ["### Image Description:", description, "### Rationales:", rationale,
             "### Let's think step by step."]
    for n, body in zip(numbers, steps):
        parts += [f"### Step {n}:", body]
    parts += ["### The final answer is:", answer]
    return "\n".join(parts) + tail


SOLUTION = completion()
# Four key steps: a plain string, an alternative list, one only in the description (never
# matched: StepRAR reads step bodies only), and one that is absent.
KEY_STEPS = ("bd", ["\\frac{12}{2}=6", "12/2 = 6"], "triangle abc", "median")
EXAMPLE = Ex(SOLUTION, KEY_STEPS)
NO_SYMBOLIC = RewardConfig(symbolic=False)


@pytest.fixture(scope="module")
def verifier():
    with SymbolicVerifier(num_workers=2, timeout_s=0.5) as v:
        yield v


# --------------------------------------------------------------------------- StepRAR

def test_step_text_is_the_authors_regex():
    text = "### Step 1:  First.\nmore\n### Step 2:\nSecond ### Step 9: inline\n### Note\nignored"
    # Bodies run to the next "###" that starts a line; an inline header stays in the body.
    assert step_text(text) == "first.\nmore second ### step 9: inline"


def test_key_step_match_hand_computed():
    # "bd" and the alternative "12/2 = 6" match; "triangle abc" is only in the description,
    # "median" only in the rationale: k = 2/4.
    assert key_step_match(SOLUTION, KEY_STEPS) == 0.5


def test_key_step_match_edges():
    assert key_step_match(SOLUTION, ()) == 0.0  # no key steps: k = 0, not 1
    assert key_step_match(SOLUTION, [["nothing", "X = 6"]]) == 1.0  # case-insensitive, any alt
    assert key_step_match(SOLUTION, [""]) == 0.0  # an empty string is not a match
    assert key_step_match("no steps at all BD = 12/2 = 6", ["bd"]) == 0.0
    assert key_step_match(SOLUTION, {"Steps": ["bd", "zzz"]}) == 0.5  # the record's dict form


def test_key_step_match_normalized_is_opt_in():
    text = completion(steps=("BD = \\frac {12} 2 = 6.0",))
    assert key_step_match(text, ["12/2=6"]) == 0.0
    assert key_step_match(text, ["12/2=6"], normalize=True) == 1.0


def test_step_rar_values():
    k = 0.5
    assert _one("step_rar", SOLUTION, EXAMPLE, NO_SYMBOLIC) == pytest.approx(1 + 0.1 * k)
    wrong = completion(answer="7")
    assert _one("step_rar", wrong, EXAMPLE, NO_SYMBOLIC) == pytest.approx(0.1 * k)
    # No answer section: 0 by the paper's rule (the authors' code paid 0.1 k here).
    no_answer = SOLUTION.split("### The final answer is:")[0]
    assert _one("step_rar", no_answer, EXAMPLE, NO_SYMBOLIC) == 0.0
    assert _one("step_rar", SOLUTION, EXAMPLE, RewardConfig(alpha=0.5, symbolic=False)) == pytest.approx(1.25)


def test_empty_answer_line_is_no_answer():
    empty = completion(answer="   \n\n")
    assert final_answer(empty) is None
    assert _one("step_rar", empty, EXAMPLE, NO_SYMBOLIC) == 0.0
    assert step_rvr(empty) == 1.0  # the header is there and in order
    b = score([empty], [EXAMPLE], NO_SYMBOLIC)
    assert not b.has_answer[0] and b.total[0] == pytest.approx(1.0)


def test_final_answer_takes_first_non_empty_line():
    assert final_answer("### The final answer is:\n\n  6 cm \nmore text") == "6 cm"
    assert final_answer("### The final answer is: 6") == "6"
    assert final_answer("no header") is None
    assert reference_answer("6") == "6"  # a bare solution is its own answer
    assert reference_answer(SOLUTION) == "6"


# --------------------------------------------------------------------------- StepRVR

@pytest.mark.parametrize("text, expected", [
    (SOLUTION, 1.0),
    (completion(steps=("a",)), 1.0),  # one step is enough
    (completion(numbers=(1, 3)), 0.0),  # a gap
    (completion(numbers=(1, 1)), 0.0),  # a repeat
    (completion(numbers=(2, 3)), 0.0),  # no "### Step 1:" (incomplete)
    (completion(numbers=(1, 2)).replace("### Rationales:", "### Reasons:"), 0.0),
    (completion().replace("### Image Description:", "### Description:"), 0.0),
    (SOLUTION + "\n### The final answer is:\n7", 0.0),  # two final answers
    (SOLUTION.replace("### Rationales:\nAD is a median of BC.\n", "")
     .replace("### Image Description:", "### Rationales:\nr\n### Image Description:"), 0.0),
    (completion(steps=("a", "b"), tail="\n### Step 3:\nafter the answer"), 0.0),
    (SOLUTION.replace("### Step 2:", "### Step 02:"), 1.0),  # int("02") == 2, as the authors
    (SOLUTION.replace("### Step 2:", "### Step " + "9" * 5000 + ":"), 0.0),
])
def test_step_rvr_rules(text, expected):
    assert step_rvr(text) == expected


def test_answer_before_last_step():
    text = ("### Image Description:\nd\n### Rationales:\nr\n### Step 1:\nBD = 12/2 = 6\n"
            "### The final answer is:\n6\n### Step 2:\nSo x = 6.")
    assert text.count("### The final answer is:") == 1
    assert text.index("### The final answer is:") < text.index("### Step 2:")
    b = score([text], [EXAMPLE], NO_SYMBOLIC)
    assert b.step_rvr[0] == 0.0
    assert b.accuracy[0] == 1.0  # the answer still counts for StepRAR


def test_multiple_final_answers_judged_on_the_first():
    hedge = completion(answer="7") + "\n### The final answer is:\n6"
    b = score([hedge], [EXAMPLE], NO_SYMBOLIC)
    assert (b.accuracy[0], b.step_rvr[0]) == (0.0, 0.0)


# --------------------------------------------------------------------------- answers

def test_exact_match_and_normalized_match():
    def acc(answer, gold="6", **cfg):
        return _one("accuracy", completion(answer=answer), Ex(completion(answer=gold)),
                    RewardConfig(symbolic=False, **cfg))
    assert acc("6") == 1.0
    assert acc("6.0") == 0.0 and acc("6.0", normalize=True) == 1.0
    assert acc("\u22123", gold="-3") == 0.0 and acc("\u22123", gold="-3", normalize=True) == 1.0
    assert acc("12,000", gold="12000", normalize=True) == 1.0
    assert acc("$\\frac 1 2$", gold="\\frac{1}{2}", normalize=True) == 1.0
    assert acc("Left", gold="left") == 0.0 and acc("Left", gold="left", normalize=True) == 1.0
    assert acc("7", gold="6", normalize=True) == 0.0


def test_symbolic_equivalence(verifier):
    def acc(answer, gold):
        return _one("accuracy", completion(answer=answer), Ex(completion(answer=gold)), verifier=verifier)
    assert acc("6.0", "6") == 1.0
    assert acc("\\frac{1}{2}", "0.5") == 1.0
    assert acc("$x = 3$", "3") == 1.0
    assert acc("7", "6") == 0.0
    assert acc("left", "right") == 0.0


def test_total_reward_maximum_and_minimum(verifier):
    full = Ex(SOLUTION, ("bd", ["x = 6"]))
    assert _one("total", SOLUTION, full, verifier=verifier) == pytest.approx(2.1)
    assert _one("total", "", full, verifier=verifier) == 0.0


# --------------------------------------------------------------------------- batches

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


# --------------------------------------------------------------------------- normalizer

@pytest.mark.parametrize("a, b", [
    ("x = 3", "x=3"), ("\\frac{1}{2}", "\\frac 1 2"), ("\\dfrac{1}{2}", "1/2"),
    ("\\frac12", "1/2"), ("6.0", "6"), ("2.50", "2.5"), ("12,345", "12345"),
    ("12\\,345", "12345"), ("\u22125", "-5"), ("$6$", "6"), ("\\left( 1 \\right)", "(1)"),
    ("a\\,b", "a b"), ("  A   b ", "a b"), ("1,234.5", "1234.5"),
    ("\\frac{x+1}{2}", "\\frac {x + 1} {2}"),
])
def test_normalize_equal(a, b):
    assert normalize_math(a) == normalize_math(b)


@pytest.mark.parametrize("a, b", [
    ("(1,234)", "(1234)"), ("3\u20135", "3-5"), ("6.01", "6"), ("1 2", "12"), ("60", "6"),
    ("1,2345", "12345"), ("\\frac{x+1}{2}", "x+1/2"),
])
def test_normalize_keeps_meaning(a, b):
    assert normalize_math(a) != normalize_math(b)


def test_normalize_is_idempotent():
    for s in ["\\frac 1 2 = 0.50", "x = 12,000.0 cm", "$\\left(\u22123\\right)$", "a  \\, b"]:
        assert normalize_math(normalize_math(s)) == normalize_math(s)


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
}


def _bounded(fn, cpu_s=1.0, wall_s=2.5):
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


# Inputs within the size and nesting caps on which math-verify runs for seconds or more
# (measured: the integral 7 s; the towers did not finish in 8 s).
HANGS = ["$\\int_0^1 e^{x^{x^x}} dx$", "$9^{9^{9^{9}}}$", "$(x+1)^{100000}$"]


def _bounded_hang(verifier, answer):
    start = time.perf_counter()
    b = score([completion(answer=answer)], [EXAMPLE], RewardConfig(), verifier)
    return b, time.perf_counter() - start


@pytest.mark.parametrize("answer", HANGS)
def test_symbolic_hang_is_bounded_and_undecided(verifier, answer):
    b, elapsed = _bounded_hang(verifier, answer)
    # Unbounded, each of these runs for minutes or forever. The margin over the 0.5 s
    # timeout covers a worker restart on a loaded machine (CI runs tests two at a time).
    assert elapsed < 4.0
    assert b.undecided.tolist() == [True] and b.accuracy[0] == 0.0
    assert b.step_rar[0] == pytest.approx(0.05)  # present but not shown correct: alpha * k
    # The worker that hung was replaced: the next check still works.
    assert _one("accuracy", completion(answer="6.0"), EXAMPLE, verifier=verifier) == 1.0


def test_symbolic_hang_is_bounded_off_the_main_thread(verifier):
    result = {}

    def run():
        result["b"], result["elapsed"] = _bounded_hang(verifier, HANGS[1])

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive()
    assert result["elapsed"] < 4.0 and result["b"].undecided[0]


def test_deep_nesting_is_not_parsed(verifier):
    # 90 nested braces parse for ~2.4 s; 10,000 would not finish: refused before parsing.
    for depth in (90, 10_000):
        start = time.perf_counter()
        assert verifier.check("1", "$" + "{" * depth + "1" + "}" * depth + "$") is None
        assert time.perf_counter() - start < 0.05


def test_batch_budget_bounds_many_hangs():
    with SymbolicVerifier(num_workers=2, timeout_s=0.5, batch_budget_s=0.8) as v:
        pairs = [("1", f"$(x+{i})^{{100000}}$") for i in range(1, 9)] + [("6", "6.0")]
        start = time.perf_counter()
        verdicts = v.check_many(pairs)
        # Started within the budget, each bounded by its timeout and a worker restart.
        assert time.perf_counter() - start < 0.8 + 0.5 + 3.0
        assert verdicts[:8] == [None] * 8


def test_verifier_is_thread_safe(verifier):
    pairs = [("6", "6.0"), ("6", "7"), ("\\frac{1}{2}", "0.5"), ("2", "3")] * 3
    results = [None] * len(pairs)

    def work(i):
        results[i] = verifier.check(*pairs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(pairs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert results == [True, False, True, False] * 3


def test_verifier_caps_input_and_survives_a_killed_worker():
    with SymbolicVerifier(num_workers=1, timeout_s=0.5, max_chars=50) as v:
        start = time.perf_counter()
        assert v.check("1", "1" * 51) is None  # over the cap: never parsed
        assert time.perf_counter() - start < 0.1
        v._all[0].proc.kill()  # a crash between checks
        assert v.check("1", "1.0") is None  # EOF: undecided, worker replaced
        assert v.check("2", "2.0") is True
        assert v.check_many([("1", "1"), ("1", "2"), ("1", "1")]) == [True, False, True]
    with pytest.raises(ValueError, match="num_workers"):
        SymbolicVerifier(num_workers=0)


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_step_bodies_are_fast_when_normalized(name):
    # Inside a step body the text reaches the normalizer and every key-step search.
    text = completion(steps=(ADVERSARIAL[name], "x = 6"))
    _bounded(lambda: normalize_math(ADVERSARIAL[name]))
    _bounded(lambda: score([text], [Ex(SOLUTION, KEY_STEPS)], RewardConfig(normalize=True, symbolic=False)))


def test_missing_math_verify_is_a_clear_error(tmp_path, monkeypatch):
    fake = tmp_path / "math_verify"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no math here')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # read by the worker process only
    with SymbolicVerifier(num_workers=1) as v:
        with pytest.raises(RuntimeError, match="math-verify cannot be imported.*no math here"):
            v.check("1", "1.0")


def test_reward_config_checks_alpha():
    with pytest.raises(ValueError, match="alpha"):
        RewardConfig(alpha=-0.1)
