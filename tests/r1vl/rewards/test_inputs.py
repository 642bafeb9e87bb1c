"""A reward file in TRL's signature: it receives the columns and the images, and the same
functions give the same per-function rewards, total and advantages through TRL 1.16's own
GRPOTrainer._calculate_rewards as through r1vl's Scorer."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from r1vl.config import make_config
from r1vl.data.prompts import Prompt
from r1vl.data.records import Example
from r1vl.rewards.inputs import prompt_messages, reward_inputs
from r1vl.rewards.scorer import Scorer
from r1vl.sampling.generate import Completions
from r1vl.sampling.sampler import Rollout

PROBE = '''
def probe(prompts, completions, completion_ids, problem, solution, key_steps, images, trainer_state, **kwargs):
    """A number made of everything it was given; None (no opinion) on completions saying 'skip'."""
    out = []
    for p, c, ids, q, s, k, ims in zip(prompts, completions, completion_ids, problem, solution, key_steps, images):
        text = c[0]["content"]
        if "skip" in text:
            out.append(None)
            continue
        in_prompt = p[0]["content"][0]["image"]
        out.append(len(text) + 0.5 * len(ids) + 0.01 * len(q) + 0.001 * len(s) + len(k) + ims[0].size[0] / 100
                   + in_prompt.getpixel((0, 0))[0] / 1000 + trainer_state.global_step)
    return out


def silent(completions, **kwargs):
    return [None] * len(completions)
'''
SOLUTION = "### Image Description:\nA shape.\n### Rationales:\nLook.\n### Step 1:\nIt is red.\n" \
           "### The final answer is:\nred"


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "probe.py").write_text(PROBE)
    examples = []
    for i, (colour, size) in enumerate([((200, 10, 10), (56, 28)), ((10, 10, 200), (84, 56))]):
        Image.new("RGB", size, colour).save(root / f"{i}.png")
        examples.append(Example(root / f"{i}.png", f"What colour is shape {i}?", SOLUTION,
                                (("red",), ("it is", "shape is")), f"train.jsonl:{i}"))
    texts = [SOLUTION, "<think>hm</think>blue", "skip", "skip",      # prompt 0: one unscorable by probe
             "### The final answer is:\nblue", "skip", "<think>a</think>b", "x"]
    G = 4
    prompts = [Prompt(torch.zeros(3, dtype=torch.int64), torch.zeros(1, 1), torch.ones(1, 3, dtype=torch.int64), e)
               for e in examples]
    ids = [torch.arange(1, 2 + i) for i in range(len(texts))]
    samples = Rollout(prompts, Completions(ids, torch.ones(len(texts), dtype=torch.bool)), texts, G, 0)
    return root, samples


def test_the_function_receives_every_column_and_the_images(setting):
    root, samples = setting
    kwargs, sources = reward_inputs(samples, step=3, num_steps=10)
    assert sources == ["train.jsonl:0", "train.jsonl:1"]
    assert sorted(kwargs) == ["completion_ids", "completions", "image", "image_path", "images", "key_steps",
                              "problem", "prompts", "solution", "trainer_state"]
    assert all(len(v) == 8 for k, v in kwargs.items() if k != "trainer_state")
    assert kwargs["trainer_state"].global_step == 2 and kwargs["trainer_state"].max_steps == 10
    assert kwargs["completions"][5] == [{"role": "assistant", "content": "skip"}]
    assert kwargs["completion_ids"][2] == [1, 2, 3]
    assert kwargs["problem"][4] == "What colour is shape 1?" and kwargs["solution"][0] == SOLUTION
    assert kwargs["key_steps"][0] == [["red"], ["it is", "shape is"]]
    assert kwargs["image_path"][7] == str(root / "1.png")
    image = kwargs["images"][5][0]
    assert isinstance(image, Image.Image) and image.size == (84, 56) and image.getpixel((3, 3)) == (10, 10, 200)
    assert kwargs["image"][5] is image and kwargs["images"][4][0] is image  # one object per record
    assert kwargs["prompts"][6][0]["content"][0]["image"] is image


def test_prompts_are_trls_multimodal_messages(setting):
    from trl.data_utils import prepare_multimodal_messages

    _, samples = setting
    image = Image.new("RGB", (28, 28))
    example = samples.prompts[0].example
    assert prompt_messages(example, [image]) == \
        prepare_multimodal_messages([{"role": "user", "content": example.problem}], images=[image])
    # A record's own conversational prompt (TRL's layout), system turn and placeholders included.
    own = [{"role": "system", "content": "Be brief."},
           {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]}]
    holder = SimpleNamespace(columns={"prompt": own}, problem="unused")
    assert prompt_messages(holder, [image, image]) == prepare_multimodal_messages(own, images=[image, image])


def _scorer(root: Path, funcs: list[str], weights: list[float]) -> Scorer:
    options = make_config(reward_funcs=funcs, reward_weights=weights, reward_timeout_s=60.0,
                          reward_symbolic=False).reward
    return Scorer(options, 4, SimpleNamespace(device=torch.device("cpu")), num_steps=10)


def _trl_rewards(functions, names, kwargs):
    """TRL 1.16's own _calculate_rewards on the rows TRL would have made of the same records."""
    from trl import GRPOTrainer

    n = len(kwargs["completions"])
    columns = [k for k in kwargs if k not in ("prompts", "completions", "completion_ids", "trainer_state")]
    inputs = [{"prompt": [{"role": "user", "content": kwargs["problem"][i]}], **{k: kwargs[k][i] for k in columns}}
              for i in range(n)]
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), is_main_process=True), args=SimpleNamespace(report_to=[]),
        reward_funcs=functions, reward_processing_classes=[None] * len(functions), reward_func_names=names,
        state=kwargs["trainer_state"], _log_completion_extra=lambda *a: None, _log_metric=lambda *a: None,
        environments=None)
    return GRPOTrainer._calculate_rewards(trainer, inputs, kwargs["prompts"], kwargs["completions"],
                                          kwargs["completion_ids"])


def test_same_rewards_total_and_advantages_as_trl(setting):
    import importlib.util

    from trl.rewards import think_format_reward
    from trl.trainer.utils import nanstd

    root, samples = setting
    funcs = ["steprar", f"{root}/probe.py:probe", "trl.rewards:think_format_reward", f"{root}/probe.py:silent"]
    weights = [1.0, 0.25, 2.0, 3.0]
    scorer = _scorer(root, funcs, weights)
    ours = scorer.score_step(samples, step=3)
    assert ours.names == ("steprar", "probe", "think_format_reward", "silent")

    spec = importlib.util.spec_from_file_location("probe_for_trl", root / "probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    steprar = ours.breakdown.step_rar.tolist()  # the built-in, as a TRL function would return it
    functions = [lambda **kw: steprar, probe.probe, think_format_reward, probe.silent]
    kwargs, _ = reward_inputs(samples, step=3, num_steps=10)
    theirs = _trl_rewards(functions, list(ours.names), kwargs)
    torch.testing.assert_close(ours.per_function, theirs, equal_nan=True)
    assert torch.isnan(ours.per_function[2, 1]) and not torch.isnan(ours.per_function[0, 1])

    total = (theirs * torch.tensor(weights).unsqueeze(0)).nansum(dim=1)  # TRL's sum_then_normalize
    total[torch.isnan(theirs).all(dim=1)] = torch.nan
    torch.testing.assert_close(ours.total, total, equal_nan=True)
    grouped = total.view(-1, 4)
    advantages = (total - torch.nanmean(grouped, dim=1).repeat_interleave(4)) / \
        (nanstd(grouped, dim=1).repeat_interleave(4) + 1e-4)
    torch.testing.assert_close(scorer.advantages(ours), torch.nan_to_num(advantages, nan=0.0))


def test_every_none_is_unscorable_with_advantage_zero(setting):
    root, samples = setting
    scorer = _scorer(root, [f"{root}/probe.py:probe"], [])
    rewards = scorer.score_step(samples, step=1)
    unscorable = torch.isnan(rewards.total)
    assert unscorable.tolist() == [t == "skip" for t in samples.texts]
    advantages = scorer.advantages(rewards)
    assert (advantages[unscorable] == 0).all() and (advantages[~unscorable] != 0).any()


def test_a_failure_on_another_rank_stops_this_one_too(setting, monkeypatch):
    """Every rank learns after scoring whether any rank's function failed (one all-reduce of a
    flag), so that all stop with an error line rather than dying in the update's collective."""
    from r1vl import distributed
    from r1vl.rewards.worker import RewardFunctionError

    root, samples = setting
    scorer = _scorer(root, ["steprar", f"{root}/probe.py:probe"], [])
    flags = []
    monkeypatch.setattr(distributed, "all_reduce_max", lambda values, device: flags.append(values) or [1.0])
    with pytest.raises(RewardFunctionError, match="a reward function failed on another rank"):
        scorer.score_step(samples, step=1)
    assert flags == [[0.0]]  # this rank's own functions succeeded


def test_images_in_every_form_a_record_may_hold_them(tmp_path):
    """PIL images, paths, bytes and HF Image structs all reach the function as PIL images."""
    import io
    from dataclasses import dataclass

    from r1vl.rewards.inputs import example_columns

    Image.new("RGB", (28, 14), (1, 2, 3)).save(tmp_path / "a.png")
    buffer = io.BytesIO()
    Image.new("RGB", (14, 28), (4, 5, 6)).save(buffer, format="PNG")

    @dataclass(frozen=True)
    class Multi:
        problem: str
        images: tuple

    pil = Image.new("RGB", (7, 7))
    record = Multi("q", (pil, tmp_path / "a.png", buffer.getvalue(), {"bytes": buffer.getvalue(), "path": None}))
    columns = example_columns(record)
    assert columns["images"][0] is pil and "image" not in columns
    assert [im.size for im in columns["images"]] == [(7, 7), (28, 14), (14, 28), (14, 28)]
    assert columns["images"][1].getpixel((0, 0)) == (1, 2, 3) and columns["images"][3].getpixel((0, 0)) == (4, 5, 6)
