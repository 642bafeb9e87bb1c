"""Steps 2 and 3, score and advantages: StepGRPO's rule-based rewards (R1-VL), StepRAR +
StepRVR with a time-bounded answer check; the Scorer (scorer.py) and the advantages
(advantages.py).

    from r1vl.rewards import score, score_groups, RewardConfig
    breakdown = score_groups(completions_per_prompt, examples)   # arrays of P*G entries

Modules: `rules` (the paper's rules on one completion's text), `answer` (the answer an
answer line states), `normalize` (the opt-in lenient matcher), `symbolic` (math-verify in
worker processes, each check on its own CPU budget), `score` (the batch entry point);
`functions` (--reward_funcs: the built-ins, the user's functions and their weighted total),
`inputs` (TRL's reward arguments built from a step's samples), `worker` (the user's functions
in a process of their own, each call with a deadline). The method, in full: docs/method.md;
writing a reward function: docs/reward_functions.md.
"""
from r1vl.rewards.answer import StatedAnswer, normalize_answer, option_letter, stated_answer
from r1vl.rewards.normalize import normalize_math
from r1vl.rewards.rules import (
    final_answer,
    is_complete,
    is_logical,
    key_step_match,
    reference_answer,
    step_bodies,
    step_rvr,
    step_text,
)
from r1vl.rewards.score import (
    RewardBreakdown,
    RewardConfig,
    default_verifier,
    score,
    score_groups,
)
from r1vl.rewards.symbolic import SymbolicVerifier

__all__ = [
    "RewardBreakdown", "RewardConfig", "StatedAnswer", "SymbolicVerifier",
    "default_verifier", "final_answer", "is_complete", "is_logical", "key_step_match",
    "normalize_answer", "normalize_math", "option_letter", "reference_answer", "score",
    "score_groups", "stated_answer", "step_bodies", "step_rvr", "step_text",
]
