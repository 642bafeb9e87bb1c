"""StepGRPO's reward for whole batches: r = r_acc (StepRAR) + r_val (StepRVR), in [0, 2.1].

    k      = matched key steps / key steps          (0 without key steps)
    r_acc  = 1 + alpha*k   answer correct
           =     alpha*k   answer present but wrong
           = 0             no answer (missing header or empty answer line)
    r_val  = 1 if complete and logical else 0      (rules.step_rvr)

The answer check (docs/method.md, "The answer check"), on the final-answer lines of the
completion and of the reference:
1. the lines are equal (exactly, or after `normalize_answer` with `normalize=True`): correct;
2. with `symbolic=False` (the paper's exact rule alone), anything else is wrong;
3. otherwise each line is read for the answer it states (`answer.stated_answer`): its
   leading expression, without the explanation after it. A completion offering several
   candidates for one answer ("5 or 6") is wrong unless the reference is itself a
   disjunction; equal stated answers are correct; two mathematical ones go to math-verify
   (`symbolic.SymbolicVerifier`), each check on its own CPU budget. A check that runs out
   of it is wrong and flagged `undecided`.

Where this differs from the authors' code:
- no answer section pays 0, not alpha*k (the paper's rule; their code paid alpha*k);
- math-verify sees only the answer the final-answer line states, not the whole completion
  (their code let a number anywhere in the text count as the answer, even with no answer
  section, and math-verify without its anchor grades the last number of what it is given:
  "7 (not 6)" passed for 6);
- StepRVR checks that Image Description, Rationales, the steps and the final answer come in
  that order and that each section header appears once (the paper's intent; their code
  checked the presence of the headers and the step numbering, never the order).

Alignment. `score` takes exactly one example per completion and checks the lengths:
completions[i] is judged against examples[i]. The public trainer repeated the reward
inputs G times on top of the sampler's own repetition, misaligning solutions and key
steps once the per-device batch exceeded G; here the repetition happens in one place,
`score_groups`, which takes the completions grouped by prompt.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from r1vl.rewards import rules
from r1vl.rewards.answer import StatedAnswer, normalize_answer, stated_answer
from r1vl.rewards.symbolic import SymbolicVerifier


class Scorable(Protocol):
    """What the reward reads from an example (r1vl.data.records.Example satisfies it)."""

    solution: str
    key_steps: Sequence[str | Sequence[str]]


@dataclass(frozen=True)
class RewardConfig:
    alpha: float = 0.1  # weight of the key-step match k inside r_acc (the paper's alpha)
    normalize: bool = False  # lenient matcher for answers and key steps; the paper's is off
    symbolic: bool = True  # stated answers and math-verify; off = line match only (exact or normalized)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha < float("inf"):
            raise ValueError(f"RewardConfig.alpha must be finite and >= 0, got {self.alpha}")


@dataclass(frozen=True)
class RewardBreakdown:
    """Per-completion rewards, all of shape (N,), in the order of the completions."""

    total: np.ndarray  # float32, step_rar + step_rvr, in [0, 2 + alpha]
    accuracy: np.ndarray  # float32, 1.0 if the final answer is correct, else 0.0
    step_rar: np.ndarray  # float32, r_acc = accuracy + alpha*k if has_answer, else 0
    step_rvr: np.ndarray  # float32, r_val in {0, 1}
    key_step_match: np.ndarray  # float32, k in [0, 1]
    has_answer: np.ndarray  # bool, a non-empty line follows "### The final answer is:"
    undecided: np.ndarray  # bool, the symbolic check ran out of budget or failed (counted wrong)

    def __len__(self) -> int:
        return len(self.total)


_default_lock = threading.Lock()
_default_verifier: SymbolicVerifier | None = None


def default_verifier() -> SymbolicVerifier:
    """The process-wide verifier used when none is passed (started on first use)."""
    global _default_verifier
    with _default_lock:
        if _default_verifier is None:
            _default_verifier = SymbolicVerifier()
        return _default_verifier


def _same(pred: str, gold: str, normalize: bool) -> bool:
    return normalize_answer(pred) == normalize_answer(gold) if normalize else pred == gold


def _judge(pred: str, gold: str, stated_gold: StatedAnswer | None,
           config: RewardConfig) -> bool | tuple[str, str]:
    """True/False when the lines decide it; (gold, pred) stated answers for math-verify."""
    if _same(pred, gold, config.normalize):
        return True
    if not config.symbolic or stated_gold is None:
        return False
    stated = stated_answer(pred)
    if stated is None or (stated.hedged and not stated_gold.hedged):
        return False  # no answer stated, or several candidates offered for one
    if _same(stated.text, stated_gold.text, config.normalize):
        return True
    if stated.kind == stated_gold.kind == "math":
        return stated_gold.text, stated.text
    return False  # words and option letters compare as strings only


def score(
    completions: Sequence[str],
    examples: Sequence[Scorable],
    config: RewardConfig = RewardConfig(),
    verifier: SymbolicVerifier | None = None,
) -> RewardBreakdown:
    """Score completions[i] against examples[i] for every i.

    Args:
        completions: N model outputs (untrusted text).
        examples: N examples, one per completion, aligned by index: a prompt sampled G
            times appears G times here (see `score_groups`, which does that for you).
        config: reward options; the defaults are the paper's rule.
        verifier: the math-verify pool; `default_verifier()` when None and config.symbolic.

    Returns:
        RewardBreakdown of N entries each.

    Raises:
        ValueError: len(completions) != len(examples).
        TypeError: a completion is not a str.
    """
    if len(completions) != len(examples):
        raise ValueError(
            f"score: {len(completions)} completions but {len(examples)} examples; pass one "
            "example per completion (examples[i] scores completions[i]), e.g. via score_groups"
        )
    for i, c in enumerate(completions):
        if not isinstance(c, str):
            raise TypeError(f"score: completions[{i}] is {type(c).__name__}, expected str")
    n = len(completions)
    k = np.zeros(n, np.float32)
    rvr = np.zeros(n, np.float32)
    correct = np.zeros(n, bool)
    has_answer = np.zeros(n, bool)
    undecided = np.zeros(n, bool)
    pending: list[tuple[int, tuple[str, str]]] = []  # (index, (gold, pred)) for math-verify
    gold_cache: dict[str, tuple[str, StatedAnswer | None]] = {}
    for i, (completion, example) in enumerate(zip(completions, examples)):
        k[i] = rules.key_step_match(completion, example.key_steps, normalize=config.normalize)
        rvr[i] = rules.step_rvr(completion)
        pred = rules.final_answer(completion)
        if pred is None:
            continue
        has_answer[i] = True
        if example.solution not in gold_cache:
            line = rules.reference_answer(example.solution)
            gold_cache[example.solution] = line, stated_answer(line)
        gold, stated_gold = gold_cache[example.solution]
        verdict = _judge(pred, gold, stated_gold, config)
        if isinstance(verdict, tuple):
            pending.append((i, verdict))
        else:
            correct[i] = verdict
    if pending:
        verifier = verifier or default_verifier()
        for (i, _), verdict in zip(pending, verifier.check_many([p for _, p in pending])):
            correct[i] = verdict is True
            undecided[i] = verdict is None
    accuracy = correct.astype(np.float32)
    rar = np.where(has_answer, accuracy + np.float32(config.alpha) * k, 0).astype(np.float32)
    return RewardBreakdown(
        total=rar + rvr, accuracy=accuracy, step_rar=rar, step_rvr=rvr, key_step_match=k,
        has_answer=has_answer, undecided=undecided,
    )


def score_groups(
    completions: Sequence[Sequence[str]],
    examples: Sequence[Scorable],
    config: RewardConfig = RewardConfig(),
    verifier: SymbolicVerifier | None = None,
) -> RewardBreakdown:
    """Score P prompts with G completions each: completions[p][g] against examples[p].

    Returns a RewardBreakdown of P*G entries in prompt-major order (entry p*G + g), the
    layout the group-normalized advantage expects. Every group must have the same size G.
    """
    if len(completions) != len(examples):
        raise ValueError(
            f"score_groups: {len(completions)} groups of completions but {len(examples)} "
            "examples; pass one example per prompt"
        )
    sizes = {len(group) for group in completions}
    if len(sizes) > 1:
        raise ValueError(f"score_groups: groups differ in size {sorted(sizes)}; expected one G")
    flat = [c for group in completions for c in group]
    repeated = [ex for ex, group in zip(examples, completions) for _ in group]
    return score(flat, repeated, config, verifier)
