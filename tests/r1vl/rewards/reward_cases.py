"""Shared completions and examples for the reward tests (docs/method.md's output format)."""
from dataclasses import dataclass

from r1vl.rewards import RewardConfig, score


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


# One completion's reward components, through the batch entry point (the package has no
# per-completion wrappers).
def answer_accuracy(text, example, config=RewardConfig(), verifier=None) -> float:
    return float(score([text], [example], config, verifier).accuracy[0])


def step_rar(text, example, config=RewardConfig(), verifier=None) -> float:
    return float(score([text], [example], config, verifier).step_rar[0])


def total_reward(text, example, config=RewardConfig(), verifier=None) -> float:
    return float(score([text], [example], config, verifier).total[0])
