"""Two reward functions of one's own, next to the paper's, on the built-in synthetic task.

    python train.py --reward_funcs steprar steprvr examples/reward_functions.py:sections_in_order \
        examples/reward_functions.py:colour_check --reward_weights 1 1 0.5 1

Each has TRL's GRPOTrainer signature, so the same file works with `GRPOTrainer(reward_funcs=[...])`:

    fn(prompts, completions, completion_ids, **columns) -> list[float | None]

one value per completion; `completions[i]` is [{"role": "assistant", "content": text}], and every
column of the record arrives as a keyword argument, one entry per completion (`problem`,
`solution`, ... and `images`, a list of PIL images per record). Take `**kwargs` for the rest.
None means "no opinion": the completion's total is the weighted sum of the others' rewards.

- `sections_in_order`, a format reward: 1 when the answer has the paper's sections in order.
- `colour_check`, a task check that reads the image: on the "what colour is the shape"
  questions, 1 when the final answer names the colour the picture's shape really has, 0 when
  it names another; no opinion (None) on the other questions.

docs/reward_functions.md says how to write, weight and test such functions;
tests/r1vl/rewards/test_example_rewards.py tests these.
"""
from __future__ import annotations

import re

HEADERS = ("### Image Description:", "### Rationales:", "### Step 1:", "### The final answer is:")
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (20, 150, 40)}


def sections_in_order(completions, **kwargs) -> list[float]:
    """1.0 when the four section headers appear, each once, in the paper's order, else 0.0."""
    rewards = []
    for completion in completions:
        text = completion[0]["content"]
        positions = [text.find(h) for h in HEADERS]
        once = all(text.count(h) == 1 for h in HEADERS)
        rewards.append(1.0 if once and positions == sorted(positions) else 0.0)
    return rewards


def final_answer(text: str) -> str | None:
    """The first non-empty line after '### The final answer is:', lowercased; None if absent."""
    match = re.search(r"### The final answer is:\s*\n?\s*(\S[^\n]*)", text)
    return match.group(1).strip().lower().rstrip(".") if match else None


def shape_colour(image) -> str:
    """The named colour nearest to the mean of the picture's non-white pixels."""
    pixels = [p for p in image.convert("RGB").getdata() if sum(p) < 600]
    if not pixels:
        return ""
    mean = [sum(channel) / len(pixels) for channel in zip(*pixels)]
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLOURS[name], mean)))


def colour_check(completions, problem, images, **kwargs) -> list[float | None]:
    """On colour questions: 1.0 if the answer names the shape's colour in the image, else 0.0."""
    rewards = []
    seen = {}  # the G completions of a prompt share its image: look once
    for completion, question, record_images in zip(completions, problem, images):
        if "colour" not in question.lower():
            rewards.append(None)
            continue
        key = id(record_images[0])
        if key not in seen:
            seen[key] = shape_colour(record_images[0])
        rewards.append(1.0 if final_answer(completion[0]["content"]) == seen[key] else 0.0)
    return rewards
