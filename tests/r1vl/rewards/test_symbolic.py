"""The math-verify pool: each check on its own CPU budget, so no completion changes another's
verdict; hangs, crashes and oversized input are undecided, never a stuck trainer."""
import math
import threading
import time

import pytest
from reward_cases import EXAMPLE, Ex, answer_accuracy, completion

from r1vl.rewards import RewardConfig, SymbolicVerifier, score

# Answers within the size and nesting caps on which math-verify runs for seconds or more
# (measured: the integral 7 s; the towers did not finish in 8 s).
HANGS = ["$\\int_0^1 e^{x^{x^x}} dx$", "$9^{9^{9^{9}}}$", "$(x+1)^{100000}$"]

BUDGET_S = 0.1  # CPU seconds per check in this file's pool; honest checks use 3-5 ms


@pytest.fixture(scope="module")
def strict():
    """No cache, so that every scoring below really runs its checks."""
    with SymbolicVerifier(num_workers=2, timeout_s=BUDGET_S, cache_size=0) as v:
        yield v


def _hostile(i):
    return completion(answer=f"${i + 2}^{{{i + 2}^{{{i + 2}^{{{i + 2}}}}}}}$")  # 2^{2^{2^2}}, ...


# Honest completions whose verdicts need math-verify, with those verdicts.
HONEST = [("6.0", "6", True), ("\\frac{1}{2}", "0.5", True), ("3, 2", "2, 3", True),
          ("x = 6", "6", True), ("7.0", "6", False), ("1, 3", "2, 3", False)]


def test_hostile_completions_do_not_change_honest_verdicts(strict):
    honest = [completion(answer=a) for a, _, _ in HONEST]
    honest_ex = [Ex(completion(answer=g)) for _, g, _ in HONEST]
    hostile = [_hostile(i) for i in range(1, 7)]  # 3^{3^{3^3}} ... 8^{8^{8^8}}
    hostile_ex = [EXAMPLE] * len(hostile)
    alone = score(honest, honest_ex, RewardConfig(), strict)
    assert alone.accuracy.tolist() == [float(v) for _, _, v in HONEST]
    assert not alone.undecided.any()
    n = len(hostile) + len(honest)
    # The time bound: each check at most BUDGET_S of CPU, the batch ceil(n / workers) of
    # them plus ~0.1 s of fork and pipe traffic each; x8 for a crowded test machine (at a
    # load of 11 on 2 cores it took 2.7 s of the 9.6 s allowed).
    bound = 8 * math.ceil(n / 2) * (BUDGET_S + 0.1)
    for texts, examples, where in [
        (hostile + honest, hostile_ex + honest_ex, slice(len(hostile), None)),  # hostile first
        ([t for pair in zip(hostile, honest) for t in pair],  # interleaved
         [e for pair in zip(hostile_ex, honest_ex) for e in pair], slice(1, None, 2)),
    ]:
        start = time.perf_counter()
        together = score(texts, examples, RewardConfig(), strict)
        elapsed = time.perf_counter() - start
        assert together.accuracy[where].tolist() == alone.accuracy.tolist()
        assert not together.undecided[where].any()
        hostile_part = [i for i in range(n) if i not in range(n)[where]]
        assert together.undecided[hostile_part].all()
        print(f"hostile + honest, {where}: {elapsed:.2f} s (bound {bound:.2f} s)")
        assert elapsed < bound, (elapsed, bound)


@pytest.mark.parametrize("answer", HANGS)
def test_symbolic_hang_is_bounded_and_undecided(strict, answer):
    start = time.perf_counter()
    b = score([completion(answer=answer)], [EXAMPLE], RewardConfig(), strict)
    # Unbounded, each of these runs for minutes or forever; here 0.1 s of CPU, which a
    # crowded machine may stretch to a second or two of wall time.
    assert time.perf_counter() - start < 4.0
    assert b.undecided.tolist() == [True] and b.accuracy[0] == 0.0
    assert b.step_rar[0] == pytest.approx(0.05)  # present but not shown correct: alpha * k
    # The worker stayed warm: the next check is decided at once.
    start = time.perf_counter()
    assert answer_accuracy(completion(answer="6.0"), EXAMPLE, verifier=strict) == 1.0
    assert time.perf_counter() - start < 2.0


def test_symbolic_hang_is_bounded_off_the_main_thread(strict):
    result = {}

    def run():
        start = time.perf_counter()
        result["b"] = score([completion(answer=HANGS[1])], [EXAMPLE], RewardConfig(), strict)
        result["elapsed"] = time.perf_counter() - start

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive()
    assert result["elapsed"] < 4.0 and result["b"].undecided[0]


def test_undecided_verdicts_are_cached(verifier):
    verifier.check("1", "9^{9^{9^{8}}}")  # out of CPU budget: as reproducible as a verdict
    start = time.perf_counter()
    assert verifier.check("1", "9^{9^{9^{8}}}") is None
    assert time.perf_counter() - start < 0.01


def test_deep_nesting_is_not_parsed(verifier):
    # 90 nested braces parse for ~2.4 s; 10,000 would not finish: refused before parsing.
    for depth in (90, 10_000):
        start = time.perf_counter()
        assert verifier.check("1", "{" * depth + "1" + "}" * depth) is None
        assert time.perf_counter() - start < 0.05


def test_verifier_is_thread_safe(verifier):
    pairs = [("6", "6.0"), ("6", "7"), ("\\frac{1}{2}", "0.5"), ("2", "3")] * 3
    results = [None] * len(pairs)

    def work(i):
        results[i] = verifier.check(*pairs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(pairs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert results == [True, False, True, False] * 3


def test_verifier_caps_input_and_survives_killed_workers(strict):
    start = time.perf_counter()
    assert strict.check("1", "1" * 201) is None  # over the cap: never parsed
    assert time.perf_counter() - start < 0.1
    for w in list(strict._all):
        w.wait_ready(time.monotonic() + 60)
        w.proc.kill()  # a crash between checks
        w.proc.wait()
    assert strict.check("1", "1.0") is True  # dead workers are replaced before a check
    assert strict.check("2", "2.0") is True
    assert strict.check_many([("1", "1"), ("1", "2"), ("1", "1")]) == [True, False, True]


def test_verifier_checks_its_arguments():
    with pytest.raises(ValueError, match="num_workers"):
        SymbolicVerifier(num_workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        SymbolicVerifier(timeout_s=0)
    with pytest.raises(ValueError, match="wall_timeout_s"):
        SymbolicVerifier(timeout_s=2.0, wall_timeout_s=1.0)


def test_missing_math_verify_is_a_clear_error(tmp_path, monkeypatch):
    fake = tmp_path / "math_verify"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no math here')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # read by the worker process only
    with SymbolicVerifier(num_workers=1) as v:
        with pytest.raises(RuntimeError, match="math-verify cannot be imported.*no math here"):
            v.check("1", "1.0")
