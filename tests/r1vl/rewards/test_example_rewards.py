"""examples/reward_functions.py on the synthetic task, called as the trainer calls it: through
the worker, with the inputs r1vl.rewards.inputs builds from the records."""
import json
from pathlib import Path

import pytest
import torch

from r1vl.data.prompts import Prompt
from r1vl.data.records import load_examples
from r1vl.data.synthetic import write_dataset
from r1vl.rewards.functions import parse_reward_funcs
from r1vl.rewards.inputs import reward_inputs
from r1vl.rewards.worker import RewardWorker
from r1vl.sampling.generate import Completions
from r1vl.sampling.sampler import Rollout

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "reward_functions.py"
WRONG = {"red": "blue", "blue": "green", "green": "red"}


@pytest.fixture(scope="module")
def worker():
    specs = parse_reward_funcs([f"{EXAMPLE}:sections_in_order", f"{EXAMPLE}:colour_check"])
    w = RewardWorker(specs, timeout_s=60).start()
    yield w
    w.close()


def test_format_and_colour_rewards_on_the_synthetic_task(tmp_path, worker):
    data = write_dataset(tmp_path, 12)
    examples = load_examples(data).items
    tasks = [json.loads(line)["task"] for line in data.read_text().splitlines()]
    assert {"colour", "count", "bars"} <= set(tasks)
    # Per record, G = 3: the reference, the reference with another colour named, no structure.
    texts = []
    for e in examples:
        answer = e.solution.rsplit("\n", 1)[1]
        texts += [e.solution, e.solution.rsplit("\n", 1)[0] + "\n" + WRONG.get(answer, "7"), answer]
    prompts = [Prompt(torch.zeros(1, dtype=torch.int64), torch.zeros(1, 1), torch.ones(1, 3), e) for e in examples]
    samples = Rollout(prompts, Completions([torch.tensor([1])] * len(texts), torch.ones(len(texts), dtype=bool)),
                      texts, 3, 0)
    kwargs, sources = reward_inputs(samples, step=1, num_steps=1)
    form = worker.call(worker.specs[0], kwargs, 3, sources)
    colour = worker.call(worker.specs[1], kwargs, 3, sources)
    assert form == [1.0, 1.0, 0.0] * len(examples)
    for i, task in enumerate(tasks):  # the bare answer has no answer header: 0, not None
        expected = [1.0, 0.0, 0.0] if task == "colour" else [None] * 3
        assert colour[3 * i:3 * i + 3] == expected, (task, colour)
