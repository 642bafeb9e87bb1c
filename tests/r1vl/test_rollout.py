"""The sampler: the image encoded once per prompt, cached decoding equal to full forwards, the
model's own distribution at temperature 1, stops at EOS, top-p."""
import pytest
import torch
from tiny_qwen_vl import FAMILIES, IMAGE, make_sample, tiny_model

from r1vl.data import load_examples
from r1vl.prompts import Prompt, encode_prompt
from r1vl.rollout import generate
from r1vl.synthetic import write_dataset
from r1vl.tiny import build_model, build_tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    examples = load_examples(write_dataset(root, n=6, seed=3)).items
    tokenizer = build_tokenizer([e.problem for e in examples] + [e.solution for e in examples], vocab_size=400)
    model = build_model(tokenizer, seed=1).eval()
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)
    prompts = [encode_prompt(e, tokenizer, processor, 2, 56 * 56, 56 * 56) for e in examples]
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return model, prompts, eos


class _Head(torch.nn.Module):
    """The model's lm_head with its logits scaled, and optionally one token forced up."""

    def __init__(self, head, scale=1.0, boost=None):
        super().__init__()
        self.head, self.scale, self.boost = head, scale, boost
        self.weight = head.weight

    def forward(self, hidden):
        logits = self.head(hidden) * self.scale
        if self.boost is not None:
            logits[..., self.boost] = 1e4
        return logits


@pytest.fixture
def head(setup):
    """Swap the lm_head for a _Head for one test: head(scale=..., boost=...)."""
    model = setup[0]
    original = model.lm_head

    def swap(**kwargs):
        model.lm_head = _Head(original, **kwargs)

    yield swap
    model.lm_head = original


def _banned(model):
    c = model.config
    return [c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id]


def _full_forward_logits(model, prompt, completion):
    """Next-token logits after prompt + completion, from one uncached forward."""
    ids = torch.cat([prompt.ids, completion])[None]
    types = (ids == model.config.image_token_id).int()
    out = model(input_ids=ids, mm_token_type_ids=types, pixel_values=prompt.pixel_values,
                image_grid_thw=prompt.image_grid_thw, use_cache=False)
    return out.logits[0, -1].float()


def test_image_tower_runs_once_per_prompt(setup):
    model, prompts, eos = setup
    calls = []
    hook = model.model.visual.register_forward_hook(lambda *args: calls.append(1))
    try:
        out = generate(model, prompts[:3], num_generations=4, max_new_tokens=5, eos_token_ids=eos,
                       generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert len(calls) == 3  # not 3 * 4
    assert len(out.ids) == 12 and all(1 <= len(ids) <= 5 for ids in out.ids)


def test_cached_batched_decoding_equals_full_forwards(setup):
    # Prompts of different lengths share one left-padded cache; at a temperature near zero
    # sampling is greedy, so every token must be the argmax of an uncached forward.
    model, prompts, eos = setup
    assert len({p.ids.numel() for p in prompts}) > 1
    out = generate(model, prompts, num_generations=2, max_new_tokens=6, eos_token_ids=[-1],
                   temperature=1e-6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i, ids in enumerate(out.ids):
            prompt = prompts[i // 2]
            # One uncached forward of prompt + completion scores every position at once.
            full = torch.cat([prompt.ids, ids])[None]
            logits = model(input_ids=full, mm_token_type_ids=(full == model.config.image_token_id).int(),
                           pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
                           use_cache=False).logits[0]
            P = prompt.ids.numel()
            logits[:, _banned(model)] = float("-inf")
            assert torch.equal(ids, logits[P - 1:P - 1 + len(ids)].argmax(-1)), f"sequence {i}"


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decoding_matches_full_forwards_for_both_families(family):
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(0)
    samples = [make_sample(gen, [(1, 4, 6)], 1), make_sample(gen, [(1, 8, 8)], 1, text_lens=[3, 9])]
    prompts = [Prompt(torch.as_tensor(s.prompt_ids), s.pixel_values, s.image_grid_thw, None) for s in samples]
    out = generate(model, prompts, 2, 5, [-1], temperature=1e-6)
    with torch.no_grad():
        for i, ids in enumerate(out.ids):
            prompt = prompts[i // 2]
            full = torch.cat([prompt.ids, ids])[None]
            logits = model(input_ids=full, mm_token_type_ids=(full == IMAGE).int(), pixel_values=prompt.pixel_values,
                           image_grid_thw=prompt.image_grid_thw).logits[0]
            logits[:, _banned(model)] = float("-inf")
            P = prompt.ids.numel()
            assert torch.equal(ids, logits[P - 1:P - 1 + len(ids)].argmax(-1)), f"sequence {i}"


def _check_frequencies(samples: torch.Tensor, probs: torch.Tensor) -> None:
    """Empirical counts against n * p: every token within 5 standard deviations, and
    Pearson's chi-square over the tokens with n * p >= 5 within 5 of its standard deviations."""
    n = samples.numel()
    probs = probs.double()
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    sigma = (n * probs * (1 - probs)).sqrt()
    assert ((counts - n * probs).abs() <= 5 * sigma + 1).all()
    common = n * probs >= 5
    dof = int(common.sum()) - 1
    assert dof >= 5, "the test needs a distribution spread over several tokens"
    rare = torch.stack([counts[~common].sum(), n * probs[~common].sum()])  # lumped into one cell
    chi2 = ((counts[common] - n * probs[common]) ** 2 / (n * probs[common])).sum()
    chi2 = chi2 + ((rare[0] - rare[1]) ** 2 / rare[1] if rare[1] >= 5 else 0.0)
    assert chi2 <= dof + 5 * (2 * dof) ** 0.5, f"chi2 {float(chi2):.1f} with {dof} degrees of freedom"


def test_temperature_one_samples_follow_the_softmax(setup, head):
    model, prompts, eos = setup
    head(scale=8.0)  # a peaked distribution, so that uniform sampling could not pass
    prompt = prompts[0]
    G = 4000
    out = generate(model, [prompt], num_generations=G, max_new_tokens=2, eos_token_ids=[-1],
                   temperature=1.0, generator=torch.Generator().manual_seed(1))
    tokens = torch.stack(out.ids)  # (G, 2)
    banned = _banned(model)
    with torch.no_grad():
        logits = _full_forward_logits(model, prompt, torch.zeros(0, dtype=torch.int64))
        logits[banned] = float("-inf")
        _check_frequencies(tokens[:, 0], torch.softmax(logits, -1))
        # The second token, through the cache, given the most frequent first token.
        first = int(torch.mode(tokens[:, 0]).values)
        chosen = tokens[tokens[:, 0] == first, 1]
        logits = _full_forward_logits(model, prompt, torch.tensor([first]))
        logits[banned] = float("-inf")
        assert chosen.numel() > 200
        _check_frequencies(chosen, torch.softmax(logits, -1))


def test_stops_at_eos_and_keeps_it(setup, head):
    model, prompts, _ = setup
    eos_id = 17
    head(boost=eos_id)  # every completion is that token, then stops
    out = generate(model, prompts[:2], num_generations=3, max_new_tokens=8, eos_token_ids=[eos_id],
                   generator=torch.Generator().manual_seed(0))
    assert out.stopped.all()
    assert all(ids.tolist() == [eos_id] for ids in out.ids)


def test_max_new_tokens_cuts_and_flags(setup):
    model, prompts, _ = setup
    out = generate(model, prompts[:2], num_generations=2, max_new_tokens=3, eos_token_ids=[-1],
                   generator=torch.Generator().manual_seed(0))
    assert not out.stopped.any() and all(len(ids) == 3 for ids in out.ids)


def test_tiny_top_p_is_greedy(setup):
    model, prompts, _ = setup
    greedy = generate(model, prompts[:1], 3, 4, [-1], temperature=1e-6, generator=torch.Generator().manual_seed(0))
    nucleus = generate(model, prompts[:1], 3, 4, [-1], temperature=1.0, top_p=1e-6,
                       generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(greedy.ids, nucleus.ids))


def test_image_tokens_are_never_sampled(setup, head):
    model, prompts, _ = setup
    image = model.config.image_token_id
    head(boost=image)
    out = generate(model, prompts[:1], 4, 4, [-1], generator=torch.Generator().manual_seed(0))
    assert not any((ids == image).any() for ids in out.ids)


def test_empty_eos_list_decodes_every_completion_to_full_length(setup, head):
    # --ignore_eos: even a model that always picks <|im_end|> must run to max_new_tokens.
    model, prompts, eos = setup
    head(boost=eos[0])
    out = generate(model, prompts[:2], num_generations=3, max_new_tokens=5, eos_token_ids=[],
                   generator=torch.Generator().manual_seed(0))
    assert not out.stopped.any()
    assert all(ids.tolist() == [eos[0]] * 5 for ids in out.ids)
