"""The user's reward functions in their worker: each failure stops with a message naming the
function, the record and what went wrong (never a traceback); bad specs are refused at start."""
import time

import pytest

from r1vl.rewards.functions import parse_reward_funcs
from r1vl.rewards.worker import RewardFunctionError, RewardWorker

FUNCTIONS = '''
import math, time

def fine(prompts, completions, completion_ids, **kwargs):
    return [float(len(c[0]["content"])) for c in completions]

def opinions(completions, **kwargs):
    print("a print goes to stderr, never into the replies")
    return [None if "?" in c[0]["content"] else 1.0 for c in completions]

def raises_on_b(completions, problem, **kwargs):
    for p in problem:
        if p == "b":
            raise KeyError("no such shape")
    return [0.0] * len(completions)

def nan(completions, **kwargs):
    return [0.0, math.nan] + [0.0] * (len(completions) - 2)

def short(completions, **kwargs):
    return [1.0]

def text(completions, **kwargs):
    return ["high"] * len(completions)

def sleeps(completions, **kwargs):
    print("this goes to stderr, not into the replies")
    time.sleep(60)

async def later(completions, **kwargs):
    return [2.0] * len(completions)

not_a_function = 3
'''


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "my_rewards.py"
    path.write_text(FUNCTIONS)
    return path


@pytest.fixture(scope="module")
def worker(module):
    names = ["fine", "opinions", "raises_on_b", "nan", "short", "text", "later"]
    w = RewardWorker(parse_reward_funcs([f"{module}:{n}" for n in names]), timeout_s=60).start()
    yield w
    w.close()


def _batch(texts_per_prompt: dict[str, list[str]]):
    """kwargs for two prompts x G completions, and the prompts' sources."""
    G = len(next(iter(texts_per_prompt.values())))
    problems = [p for p in texts_per_prompt for _ in range(G)]
    completions = [[{"role": "assistant", "content": t}] for ts in texts_per_prompt.values() for t in ts]
    kwargs = {"prompts": [[{"role": "user", "content": p}] for p in problems], "completions": completions,
              "completion_ids": [[1, 2]] * len(completions), "problem": problems}
    return kwargs, G, [f"train.jsonl:{i}" for i in range(len(texts_per_prompt))]


def _spec(worker, name):
    return next(s for s in worker.specs if s.name == name)


def test_values_and_none(worker):
    kwargs, G, sources = _batch({"a": ["x", "yy"], "b": ["zzz", "?"]})
    assert worker.call(_spec(worker, "fine"), kwargs, G, sources) == [1.0, 2.0, 3.0, 1.0]
    assert worker.call(_spec(worker, "opinions"), kwargs, G, sources) == [1.0, 1.0, 1.0, None]
    assert worker.call(_spec(worker, "later"), kwargs, G, sources) == [2.0] * 4  # async def, as TRL allows


@pytest.mark.parametrize("name, message", [
    ("raises_on_b", r"reward function raises_on_b \(.*my_rewards.py:raises_on_b\) raised on record train.jsonl:1: "
                    r"KeyError: 'no such shape' \(my_rewards.py line 14\)$"),
    ("nan", r"reward function nan .* returned nan for completion 1 of record train.jsonl:0; rewards must be finite"),
    ("short", r"reward function short .* returned 1 rewards for 4 completions .* records train.jsonl:0, train.jsonl:1"),
    ("text", r"reward function text .* returned str 'high' at position 0, expected a float or None"),
])
def test_each_failure_names_the_function_and_the_record(worker, name, message):
    kwargs, G, sources = _batch({"a": ["x", "yy"], "b": ["zzz", "?"]})
    with pytest.raises(RewardFunctionError, match=message) as caught:
        worker.call(_spec(worker, name), kwargs, G, sources)
    assert "Traceback" not in str(caught.value)
    assert worker.call(_spec(worker, "fine"), kwargs, G, sources) == [1.0, 2.0, 3.0, 1.0]  # the worker lives on


def test_a_slow_function_is_stopped_at_the_deadline(module):
    worker = RewardWorker(parse_reward_funcs([f"{module}:sleeps"]), timeout_s=2).start()
    kwargs, G, sources = _batch({"a": ["x", "y"]})
    start = time.monotonic()
    with pytest.raises(RewardFunctionError, match=r"reward function sleeps .* ran past --reward_timeout_s 2 s on 2 "
                                                   r"completions of record train.jsonl:0; it was stopped"):
        worker.call(worker.specs[0], kwargs, G, sources)
    assert time.monotonic() - start < 10
    assert worker._process is None  # killed, not left running


@pytest.mark.parametrize("spec, message", [
    ("{m}:missing", r"--reward_funcs: .*my_rewards.py has no attribute 'missing'"),
    ("{m}:not_a_function", r"--reward_funcs: .*my_rewards.py:not_a_function is a int, not a function"),
    ("no_such_package_r1vl.rewards:fn", r"--reward_funcs: importing no_such_package_r1vl.rewards failed: "
                                        r"ModuleNotFoundError"),
])
def test_bad_functions_are_refused_at_start(module, spec, message):
    with pytest.raises(ValueError, match=message):
        RewardWorker(parse_reward_funcs([spec.format(m=module)]), timeout_s=60).start()


def test_bad_specs_are_refused_before_any_worker(module, tmp_path):
    for funcs, weights, message in [
        (["nowhere.py:fn"], (), "--reward_funcs nowhere.py:fn: no such file nowhere.py"),
        (["fn"], (), "--reward_funcs fn: expected one of steprar, steprvr, accuracy"),
        ([f"{module}:fine", f"{module}:fine"], (), "lists .* more than once"),
        (["steprar", f"{module}:fine"], (1.0,), "--reward_weights has 1 value"),
        (["steprar"], (float("nan"),), "--reward_weights must be finite"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_reward_funcs(funcs, weights)
    other = tmp_path / "other.py"
    other.write_text("def fine(**k): return []\n")
    specs = parse_reward_funcs(["steprar", f"{module}:fine", f"{other}:fine", "trl.rewards:think_format_reward"])
    assert [s.name for s in specs] == ["steprar", "my_rewards.fine", "other.fine", "think_format_reward"]
    assert [s.builtin for s in specs] == [True, False, False, False]
