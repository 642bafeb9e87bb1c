"""Every use of the trainer's own modules, in one place.

Checkpoint loading, prompt encoding, the sampler and the distributed helpers are imported
here and nowhere else in r1vl.eval, so that a rename in the trainer is a one-line fix.
"""
from __future__ import annotations

import torch

from r1vl import distributed  # noqa: F401  (init, barrier, destroy)
from r1vl.chat_api import chat_completion  # noqa: F401  (the judge's requests)
from r1vl.data.prompts import Prompt, encode_prompt  # noqa: F401
from r1vl.data.records import BadRecordError, Example, load_examples, load_image  # noqa: F401
from r1vl.distributed import Dist  # noqa: F401
from r1vl.model.families import family_of  # noqa: F401  (the family's default system turn)
from r1vl.model.policy import Policy, check_checkpoint_dir, eos_token_ids, load_policy  # noqa: F401
from r1vl.progress import progress_bar  # noqa: F401
from r1vl.rewards import RewardConfig, score
from r1vl.rewards.normalize import normalize_math  # noqa: F401
from r1vl.rewards.rules import FINAL_ANSWER, final_answer, reference_answer  # noqa: F401
from r1vl.sampling.generate import generate

# The sampler draws from the nucleus of softmax(logits / T). With top_p this small the
# nucleus is the single most likely token (the top token is always kept, and the next one
# is dropped as soon as the mass before it, at least 1/V, reaches top_p), so the draw is
# the argmax whatever the generator: greedy decoding through the unchanged sampler.
GREEDY_TOP_P = 1e-9


def greedy(model: torch.nn.Module, prompts: list[Prompt], max_new_tokens: int,
           eos_token_ids: list[int]) -> list[torch.Tensor]:
    """Greedy completions, one per prompt: (C_i,) int64 CPU tensors, EOS kept when reached.

    All prompts decode together, each image encoded once.
    """
    out = generate(model, prompts, 1, max_new_tokens, eos_token_ids, temperature=1.0, top_p=GREEDY_TOP_P)
    return list(out.ids)


def answer_accuracy(completion: str, example) -> float:
    """1.0 if the completion's final answer is right for `example` under the trainer's own
    rule (r1vl.rewards with its default RewardConfig), else 0.0."""
    return float(score([completion], [example], RewardConfig()).accuracy[0])


eos_ids = eos_token_ids  # the tokens that end an assistant turn, as the trainer stops at them
