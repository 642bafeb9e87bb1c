"""The sampler: the image encoded once per prompt; every sampled token's log-probability and
position equal those of one uncached forward over prompt + completion, with finished rows
compacted away mid-way; the model's own distribution at temperature 1; stops at EOS, top-p."""
import pytest
import torch
from reference_sampler import generate_reference
from tiny_qwen_vl import FAMILIES, make_sequence, tiny_model
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import r1vl.sampling.generate
from r1vl.data.prompts import Prompt, encode_prompt
from r1vl.data.records import load_examples
from r1vl.data.synthetic import write_dataset
from r1vl.sampling.decode import fuse_layers
from r1vl.sampling.generate import bucket_size, generate
from r1vl.tiny import build_model, build_tokenizer


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


def test_image_tower_sees_each_image_once(setup):
    model, prompts, eos = setup
    rows = []
    hook = model.model.visual.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        out = generate(model, prompts[:3], num_generations=4, max_new_tokens=5, eos_token_ids=eos,
                       generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert sum(rows) == sum(p.pixel_values.shape[0] for p in prompts[:3])  # not 4 times that
    assert len(out.ids) == 12 and all(1 <= len(ids) <= 5 for ids in out.ids)


def _tiny_prompts(gen, text_lens, family):
    """Prompts of uneven lengths (images of different grids, text around them)."""
    grids = [(1, 4, 6), (1, 8, 8), (1, 4, 4)]
    sequences = [make_sequence(gen, [grid], 1, text_lens=lens, family=family) for grid, lens in zip(grids, text_lens)]
    return [Prompt(torch.as_tensor(s.prompt_ids), s.pixel_values, s.image_grid_thw, None) for s in sequences]


def _full_logits(model, prompt, completion):
    """(C, V) fp32 logits predicting each completion token, from one uncached forward."""
    full = torch.cat([prompt.ids, completion])[None]
    with torch.no_grad():
        logits = model(input_ids=full, mm_token_type_ids=(full == model.config.image_token_id).int(),
                       pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
                       use_cache=False).logits[0].float()
    P = prompt.ids.numel()
    return logits[P - 1:P - 1 + completion.numel()]


def _stop_set(model, n=12):
    """n ordinary token ids: with a random model, some completions stop early, some never."""
    return list(range(3, 3 + 7 * n, 7))


@pytest.mark.parametrize("family,temperature,top_p,fused", [
    ("qwen2_vl", 1.0, 1.0, True), ("qwen2_5_vl", 1.0, 1.0, True), ("qwen2_vl", 0.7, 0.9, True),
    ("qwen2_5_vl", 0.7, 0.9, False), ("qwen3_vl", 1.0, 1.0, True), ("qwen3_vl", 0.7, 0.9, False)])
def test_decoding_logprobs_equal_one_uncached_forward(family, temperature, top_p, fused, monkeypatch):
    # Uneven prompts, completions stopping at different steps (rows compacted away mid-way):
    # every sampled token's log-probability, computed while decoding, must equal that of one
    # uncached forward over prompt + completion. A decode position off by one, or a dropped
    # M-RoPE delta, changes these by far more than 1e-5. fused=False: the step calls the
    # model's modules instead of the joined weights (what non-stock layers get).
    if not fused:
        monkeypatch.setattr(r1vl.sampling.generate, "fuse_layers", lambda model: None)
    model = tiny_model(family)
    prompts = _tiny_prompts(torch.Generator().manual_seed(1), [[2, 5], [7, 1], [4, 9]], family)
    G, max_new = 4, 24
    # 12 stop tokens (8 for Qwen3-VL, whose random tiny model draws them more often): some
    # completions stop within a few tokens, some never.
    stops = _stop_set(model, 8 if family == "qwen3_vl" else 12)
    out = generate(model, prompts, G, max_new, stops, temperature=temperature, top_p=top_p,
                   generator=torch.Generator().manual_seed(2))
    lengths = [len(ids) for ids in out.ids]
    assert min(lengths) < max_new // 2 and max(lengths) == max_new, lengths  # rows did leave mid-way
    assert out.decode_slots < len(lengths) * max_new  # ... and the decode batch shrank
    for i, (ids, logprobs) in enumerate(zip(out.ids, out.logprobs)):
        expected = torch.log_softmax(_full_logits(model, prompts[i // G], ids) / temperature, -1)
        torch.testing.assert_close(logprobs, expected.gather(-1, ids[:, None])[:, 0], rtol=0, atol=1e-5,
                                   msg=lambda m: f"sequence {i}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_positions_equal_the_models_rope_index(family, monkeypatch):
    model = tiny_model(family, seed=5)
    prompts = _tiny_prompts(torch.Generator().manual_seed(5), [[2, 3], [1, 1], [5, 2]], family)
    seen = []

    def recording_step(model_, tokens, positions, column, *args):
        seen.append((int(column), positions.clone()))
        return r1vl.sampling.decode.decode_step(model_, tokens, positions, column, *args)

    import r1vl.sampling.decode

    monkeypatch.setattr(r1vl.sampling.generate, "decode_step", recording_step)
    G, max_new = 2, 6
    # No stops: row i is sequence i throughout.
    out = generate(model, prompts, G, max_new, [], generator=torch.Generator().manual_seed(0))
    assert [column for column, _ in seen] == list(range(max_new - 1))
    for i, ids in enumerate(out.ids):
        full = torch.cat([prompts[i // G].ids, ids])[None]
        rope, _ = model.model.get_rope_index(full, mm_token_type_ids=(full == model.config.image_token_id).int(),
                                             image_grid_thw=prompts[i // G].image_grid_thw)
        P = prompts[i // G].ids.numel()
        for column, positions in seen:  # token `column` of the completion is fed at this step
            assert (rope[:, 0, P + column] == positions[i]).all(), (i, column)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decoding_equals_full_forwards_with_compaction(family):
    model = tiny_model(family, seed=3)
    prompts = _tiny_prompts(torch.Generator().manual_seed(4), [[3, 1], [1, 8], [6, 2]], family)
    G, max_new = 3, 16
    out = generate(model, prompts, G, max_new, _stop_set(model, 24), temperature=1e-6,
                   generator=torch.Generator().manual_seed(0))
    lengths = [len(ids) for ids in out.ids]
    assert min(lengths) < max_new and out.decode_slots < len(lengths) * max(lengths), lengths
    for i, ids in enumerate(out.ids):
        logits = _full_logits(model, prompts[i // G], ids)
        logits[:, _banned(model)] = float("-inf")
        assert torch.equal(ids, logits.argmax(-1)), f"sequence {i}"


@pytest.mark.parametrize("compact_fraction", [1 / 32, None])
def test_a_sequence_never_depends_on_its_neighbours_stopping(setup, compact_fraction):
    # Greedy: with no EOS every sequence runs to the end; with EOS tokens each must be the same
    # sequence cut at its first EOS, whether finished rows were compacted away or kept.
    model, prompts, _ = setup
    kwargs = dict(temperature=1e-6, generator=torch.Generator().manual_seed(0), compact_fraction=compact_fraction)
    free = generate(model, prompts, 2, 12, [], **kwargs)
    tokens = torch.stack(free.ids)
    # Stop tokens that some sequences hold and others never do.
    counts = {t: sum(t in row for row in tokens.tolist()) for t in tokens.unique().tolist()}
    stop = [t for t, n in counts.items() if 0 < n < tokens.shape[0]][:2]
    stopped = generate(model, prompts, 2, 12, stop, **kwargs)
    assert stopped.stopped.any() and not stopped.stopped.all()
    for i, ids in enumerate(stopped.ids):
        assert torch.equal(ids, free.ids[i][:len(ids)]), f"sequence {i}"
    if compact_fraction is None:
        assert stopped.decode_slots == tokens.shape[0] * max(len(ids) for ids in stopped.ids)


def test_greedy_agrees_with_the_reference_sampler(setup):
    model, prompts, eos = setup
    fast = generate(model, prompts, 2, 8, eos, temperature=1e-6, generator=torch.Generator().manual_seed(0))
    reference = generate_reference(model, prompts, 2, 8, eos, temperature=1e-6,
                                   generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(fast.ids, reference.ids))
    assert torch.equal(fast.stopped, reference.stopped)


@pytest.fixture
def fresh_dynamo():
    """No compiled graphs before or after a compiled-step test. Dynamo keeps its graphs per code
    object (decode_step's, whichever torch.compile wrapper made them), where they count towards
    its recompile limit, and _Stepper keeps its compiled functions at class level."""
    def clear():
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        r1vl.sampling.generate._Stepper._compiled.clear()

    clear()
    yield
    clear()


class _RecordingBackend:
    """A torch.compile backend that runs each captured graph as it is (as backend "eager"
    does) and keeps the real tensors each compile was given: one entry per compile."""

    def __init__(self):
        self.inputs = []

    def __call__(self, graph_module, example_inputs):
        self.inputs.append(list(example_inputs))
        return graph_module.forward


def test_compiled_step_with_bucketed_batches_equals_eager(setup, fresh_dynamo):
    # torch.compile captures the whole step (fullgraph); the batch is padded to buckets, the
    # completion columns masked. A backend that runs dynamo's capture as it is, no code
    # generation (inductor's takes minutes on a busy CPU; the GPU test compiles with it). The
    # batch size is dynamic: one compile serves both batch buckets.
    model, prompts, _ = setup
    prompts = prompts[:3]
    stop = _stop_set(model, 30)
    eager = generate(model, prompts, 3, 10, stop, temperature=1e-6, generator=torch.Generator().manual_seed(0))
    lengths = [len(ids) for ids in eager.ids]
    assert bucket_size(sum(n == 10 for n in lengths), 9) < 9, lengths  # the compiled run pads a bucket
    backend = _RecordingBackend()
    compiled = generate(model, prompts, 3, 10, stop, temperature=1e-6, generator=torch.Generator().manual_seed(0),
                        compile_step=True, compile_backend=backend)
    assert len(backend.inputs) == 1
    assert all(torch.equal(a, b) for a, b in zip(eager.ids, compiled.ids))
    for a, b in zip(eager.logprobs, compiled.logprobs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_bucket_sizes():
    assert [bucket_size(n, 1000) for n in (1, 8, 9, 100, 128, 129, 250, 257, 300)] == \
        [8, 8, 16, 104, 128, 136, 256, 272, 304]
    assert bucket_size(7, 5) == 5


def test_progress_bar_is_off_when_not_a_tty(setup, capsys, monkeypatch):
    """The rollout's bar is transient: drawn on a terminal, and off a terminal not even when
    asked for (a log file gets no redraws; r1vl.progress)."""
    model, prompts, eos = setup
    generate(model, prompts[:1], 2, 3, eos, generator=torch.Generator().manual_seed(0))
    assert "rollout" not in capsys.readouterr().err
    generate(model, prompts[:1], 2, 3, [], generator=torch.Generator().manual_seed(0), progress=True)
    assert "rollout" not in capsys.readouterr().err
    monkeypatch.setattr("r1vl.progress._is_tty", lambda file: True)  # as on a terminal
    generate(model, prompts[:1], 2, 3, [], generator=torch.Generator().manual_seed(0), progress=True)
    assert "rollout" in capsys.readouterr().err


def test_bad_arguments_are_refused(setup):
    model, prompts, eos = setup
    for kwargs, name in [(dict(num_generations=0), "num_generations"), (dict(max_new_tokens=0), "max_new_tokens"),
                         (dict(temperature=0.0), "temperature"), (dict(top_p=0.0), "top_p")]:
        args = dict(num_generations=2, max_new_tokens=3, eos_token_ids=eos) | kwargs
        with pytest.raises(ValueError, match=name):
            generate(model, prompts[:1], **args)


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


@pytest.mark.parametrize("temperature, scale", [(1.0, 8.0), (2.0, 16.0)])
def test_samples_follow_the_tempered_softmax(setup, head, temperature, scale):
    """At T = 1, and at T = 2 (where a draw from logits / T**2 or / 1 would fail)."""
    model, prompts, eos = setup
    head(scale=scale)  # a peaked distribution, so that uniform sampling could not pass
    prompt = prompts[0]
    G = 4000
    out = generate(model, [prompt], num_generations=G, max_new_tokens=2, eos_token_ids=[-1],
                   temperature=temperature, generator=torch.Generator().manual_seed(1))
    tokens = torch.stack(out.ids)  # (G, 2)
    banned = _banned(model)
    with torch.no_grad():
        logits = _full_forward_logits(model, prompt, torch.zeros(0, dtype=torch.int64))
        logits[banned] = float("-inf")
        _check_frequencies(tokens[:, 0], torch.softmax(logits / temperature, -1))
        # The second token, through the cache, given the most frequent first token.
        first = int(torch.mode(tokens[:, 0]).values)
        chosen = tokens[tokens[:, 0] == first, 1]
        logits = _full_forward_logits(model, prompt, torch.tensor([first]))
        logits[banned] = float("-inf")
        assert chosen.numel() > 200
        _check_frequencies(chosen, torch.softmax(logits / temperature, -1))


def test_stops_at_eos_and_keeps_it(setup, head):
    model, prompts, _ = setup
    eos_id = 17
    head(boost=eos_id)  # every completion is that token, then stops
    out = generate(model, prompts[:2], num_generations=3, max_new_tokens=8, eos_token_ids=[eos_id],
                   generator=torch.Generator().manual_seed(0))
    assert out.stopped.all()
    assert all(ids.tolist() == [eos_id] for ids in out.ids)
    # Every row stopped at its first token: the sampler ran that one position and no more
    # (a stopped row counted live again would keep decoding to max_new_tokens).
    assert out.decode_slots == 2 * 3


@pytest.mark.parametrize("compact_fraction", [None, 1 / 32])
def test_decode_work_ends_when_the_last_sequence_stops(setup, compact_fraction):
    """Half the vocabulary stops a sequence, so rows stop at scattered steps and, left in the
    batch, draw on past their end. A stopped row must stay stopped: without compaction the
    sampler decodes every row for exactly as many positions as the longest completion, and
    with compaction no more than that."""
    model, prompts, _ = setup
    vocab = model.config.text_config.vocab_size
    stop = [t for t in range(0, vocab, 2) if t not in _banned(model)]
    out = generate(model, prompts[:3], num_generations=4, max_new_tokens=40, eos_token_ids=stop,
                   generator=torch.Generator().manual_seed(3), compact_fraction=compact_fraction)
    lengths = [len(ids) for ids in out.ids]
    assert out.stopped.all() and len(set(lengths)) > 2, lengths
    if compact_fraction is None:
        assert out.decode_slots == 12 * max(lengths)
    else:
        assert sum(lengths) <= out.decode_slots < 12 * max(lengths)


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


def test_column_buckets():
    from r1vl.sampling.generate import column_bucket, column_buckets

    assert [column_bucket(n, 1024) for n in (1, 31, 32, 33, 64, 65, 500, 513, 1024)] == \
        [32, 32, 32, 64, 64, 128, 512, 1024, 1024]
    assert [column_bucket(n, 80) for n in (1, 33, 64, 65, 79)] == [32, 64, 64, 80, 80]
    assert column_bucket(3, 10) == 10  # never past the cache's columns
    for capacity in (1, 10, 32, 33, 80, 1024, 1025):
        assert column_buckets(capacity) == sorted({column_bucket(n, capacity) for n in range(1, capacity + 1)})


def test_compiled_step_attends_only_over_the_bucket_of_its_columns(setup, fresh_dynamo):
    # After t + 1 completion columns are written, the step reads those rounded up to a power
    # of two (at least 32, at most max_new_tokens) and masks the rest; it must not read all
    # max_new_tokens columns at every step. Recorded where generate calls the compiled step.
    import inspect

    from r1vl.sampling.decode import decode_step

    attended = []
    compiled = torch.compile(decode_step, backend="eager", fullgraph=True)

    def step(*args):
        attended.append(inspect.signature(decode_step).bind(*args).arguments["columns"])
        return compiled(*args)

    r1vl.sampling.generate._Stepper._compiled[("eager", "cpu")] = step
    model, prompts, _ = setup
    max_new = 40
    generate(model, prompts[:1], 2, max_new, [], compile_step=True, compile_backend="eager",
             generator=torch.Generator().manual_seed(0))
    assert attended == [min(max_new, max(32, 1 << t.bit_length())) for t in range(max_new - 1)], \
        f"columns attended at steps 0, 1, ...: {attended}"


def test_compiled_step_compiles_once_per_column_bucket(setup, fresh_dynamo):
    # A whole rollout through two column buckets (32 and 40 columns): one compile per bucket,
    # not one per step, no graph break, and the same tokens and log-probabilities as the eager
    # step. Rows are not compacted, so that both runs draw the same uniforms at temperature 1
    # (batch buckets: test_compiled_step_with_bucketed_batches_equals_eager). The default
    # compile limit is set to 1 here: the step must carry its own, or its second compile raises.
    model, prompts, _ = setup
    max_new = 40
    kwargs = dict(eos_token_ids=_stop_set(model, 4), compact_fraction=None)
    eager = generate(model, prompts[:2], 2, max_new, generator=torch.Generator().manual_seed(0), **kwargs)
    backend = _RecordingBackend()
    with torch._dynamo.config.patch(recompile_limit=1):
        compiled = generate(model, prompts[:2], 2, max_new, generator=torch.Generator().manual_seed(0),
                            compile_step=True, compile_backend=backend, **kwargs)
    lengths = [len(ids) for ids in compiled.ids]
    assert max(lengths) == max_new and min(lengths) < max_new, lengths
    compiles = len(backend.inputs)
    assert compiles == 2, f"{compiles} compiles for 2 column buckets"
    assert not torch._dynamo.utils.counters["graph_break"]
    assert all(torch.equal(a, b) for a, b in zip(eager.ids, compiled.ids))
    for a, b in zip(eager.logprobs, compiled.logprobs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_compiled_qwen3_vl_step_equals_eager_and_reuses_its_weights(fresh_dynamo):
    # Qwen3-VL's joined projections have no bias (and q_norm / k_norm after them): the compiled,
    # bucketed step gives the eager tokens and log-probabilities, and a second graphed rollout
    # gets the same joined weights back with the current values copied in.
    from r1vl.sampling.generate import fused_weights

    model = tiny_model("qwen3_vl", seed=2)
    prompts = _tiny_prompts(torch.Generator().manual_seed(3), [[2, 5], [7, 1], [4, 9]], "qwen3_vl")
    kwargs = dict(eos_token_ids=_stop_set(model, 8), compact_fraction=None, temperature=1e-6)
    eager = generate(model, prompts, 2, 36, generator=torch.Generator().manual_seed(0), **kwargs)
    compiled = generate(model, prompts, 2, 36, generator=torch.Generator().manual_seed(0), compile_step=True,
                        compile_backend="eager", **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(eager.ids, compiled.ids))
    assert max(len(ids) for ids in eager.ids) > 32  # two column buckets
    for a, b in zip(eager.logprobs, compiled.logprobs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    first = fused_weights(model, reuse=True)
    assert first is not None and first[0].qkv_bias is None
    with torch.no_grad():
        model.model.language_model.layers[0].self_attn.k_proj.weight.mul_(2.0)
    again = fused_weights(model, reuse=True)
    assert again is first and torch.equal(again[0].qkv_weight, fuse_layers(model)[0].qkv_weight)


def test_compiled_step_takes_the_cache_and_weights_at_static_addresses(setup, fresh_dynamo, monkeypatch):
    # Under CUDA graphs an input without a static address is copied into the graph's buffer
    # at every replay. The step must receive the cache's own tensors and the joined weights,
    # marked static, not slices of them; only the per-step inputs may move: tokens,
    # positions, slots (B,) and the column ().
    made = []

    def keep(make):
        def kept(*args, **kwargs):
            made.append(make(*args, **kwargs))
            return made[-1]
        return kept

    monkeypatch.setattr(r1vl.sampling.generate, "rollout_cache", keep(r1vl.sampling.generate.rollout_cache))
    monkeypatch.setattr(r1vl.sampling.generate, "fused_weights", keep(r1vl.sampling.generate.fused_weights))
    model, prompts, _ = setup
    backend = _RecordingBackend()
    generate(model, prompts[:2], 2, 6, [], compile_step=True, compile_backend=backend,
             generator=torch.Generator().manual_seed(0))
    (inputs,) = backend.inputs
    cache, fused = made
    own = {name: getattr(cache, name) for name in ("prefix_k", "prefix_v", "prefix_bias", "comp_k", "comp_v")}
    own |= {f"layer {i} {name}": t for i, layer in enumerate(fused) for name, t in layer._asdict().items()}
    not_passed = [name for name, t in own.items() if not any(x is t for x in inputs)]
    assert not not_passed, f"reach the compiled step as other tensors (slices): {not_passed}"
    moving = [tuple(x.shape) for x in inputs
              if isinstance(x, torch.Tensor) and torch._dynamo.utils.get_static_address_type(x) is None]
    assert sorted(moving) == [(), (4,), (4,), (4,)], f"inputs without a static address: {moving}"


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graphed_step_equals_eager_in_bf16(family, fresh_dynamo):
    # On a GPU the step is compiled by inductor and replayed as CUDA graphs, one per bucket.
    model = tiny_model(family).to("cuda", torch.bfloat16)
    prompts = _tiny_prompts(torch.Generator().manual_seed(1), [[2, 5], [7, 1], [4, 9]], family)
    stop = _stop_set(model, 20)
    runs = [generate(model, prompts, 8, 40, stop, temperature=1e-6, compile_step=compiled,
                     generator=torch.Generator("cuda").manual_seed(0)) for compiled in (False, True, True)]
    eager, compiled, replayed = runs
    assert eager.decode_slots < 24 * 40  # rows left mid-way, buckets changed
    for other in (compiled, replayed):  # the second call replays the recorded graphs
        agree = sum(torch.equal(a, b) for a, b in zip(eager.ids, other.ids))
        assert agree >= 22, f"{agree} of 24 greedy sequences agree"  # bf16: a near-tie may flip
    for ids, logprobs, prompt in zip(eager.ids, eager.logprobs, [p for p in prompts for _ in range(8)]):
        expected = torch.log_softmax(_full_logits(model, _to_cuda(prompt), ids.cuda()), -1)
        assert (logprobs.cuda() - expected.gather(-1, ids.cuda()[:, None])[:, 0]).abs().max() < 0.1


def _to_cuda(prompt):
    return Prompt(prompt.ids.cuda(), prompt.pixel_values.cuda(torch.bfloat16), prompt.image_grid_thw.cuda(), None)


def test_compaction_moves_only_the_rows_past_the_new_end():
    from r1vl.sampling.generate import fill_holes, grid_slots

    live = torch.tensor([1, 0, 1, 0, 1, 1, 0, 1]).bool()
    keep, movers, holes = fill_holes(live, 5)
    assert holes.tolist() == [1, 3] and movers.tolist() == [5, 7]
    assert keep.tolist() == [0, 5, 2, 7, 4] and live[keep].all()
    slots, group = grid_slots(torch.tensor([2, 0, 2, 1, 2]), 3)
    assert group == 3 and slots.tolist() == [6, 0, 7, 3, 8]  # distinct places, prompt p at p * 3 + rank


def test_graphed_rollouts_reuse_the_cache_and_fused_weights(setup):
    # CUDA graphs replay fixed addresses: the next rollout of the same shape must get the same
    # buffers, with its own prompt lengths masked and the current weights copied in.
    from r1vl.sampling.generate import fused_weights, rollout_cache

    model = setup[0]
    first = rollout_cache(model, [70, 66], 4, 8, reuse=True)
    assert first.prefix_bias.shape == (2, 128)  # capacity rounded up to 64
    second = rollout_cache(model, [61, 80], 4, 8, reuse=True)
    assert second is first and torch.isinf(second.prefix_bias).sum(1).tolist() == [128 - 61, 128 - 80]
    assert rollout_cache(model, [61, 80, 5], 4, 8, reuse=True) is not first  # another shape
    weights = fused_weights(model, reuse=True)
    q_proj = model.model.language_model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q_proj.weight.add_(1.0)
        again = fused_weights(model, reuse=True)
        assert again[0].qkv_weight is weights[0].qkv_weight
        assert torch.equal(again[0].qkv_weight[:q_proj.out_features], q_proj.weight)
        q_proj.weight.sub_(1.0)


# ------------------------------------------------------------------ several images per prompt

def _two_image_prompts(gen, family):
    """Prompts with two images each (grids of different sizes, text between and around them)."""
    sequences = [make_sequence(gen, grids, 1, text_lens=lens, family=family) for grids, lens in
                 (([(1, 4, 6), (1, 2, 2)], [2, 3, 1]), ([(1, 8, 4), (1, 4, 4)], [1, 1, 5]))]
    return [Prompt(torch.as_tensor(s.prompt_ids), s.pixel_values, s.image_grid_thw, None) for s in sequences]


@pytest.mark.parametrize("family", FAMILIES)
def test_two_images_per_prompt_equal_the_reference_sampler_and_one_forward(family):
    # Each prompt's two images prefilled once: the sampled tokens (greedy) equal the reference
    # sampler's (HF's own forward with a DynamicCache), and every token's log-probability
    # equals one uncached HF forward over prompt + completion with the same two images.
    model = tiny_model(family, seed=2)
    prompts = _two_image_prompts(torch.Generator().manual_seed(6), family)
    rows = []
    hook = model.model.visual.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    kwargs = dict(temperature=1e-6, generator=torch.Generator().manual_seed(0))
    try:
        fast = generate(model, prompts, 3, 10, _stop_set(model, 12), **kwargs)
    finally:
        hook.remove()
    assert sum(rows) == sum(p.pixel_values.shape[0] for p in prompts)  # each image once, not G times
    reference = generate_reference(model, prompts, 3, 10, _stop_set(model, 12), **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(fast.ids, reference.ids))
    assert torch.equal(fast.stopped, reference.stopped)
    sampled = generate(model, prompts, 2, 8, [], temperature=0.8, generator=torch.Generator().manual_seed(1))
    for i, (ids, logprobs) in enumerate(zip(sampled.ids, sampled.logprobs)):
        expected = torch.log_softmax(_full_logits(model, prompts[i // 2], ids) / 0.8, -1)
        torch.testing.assert_close(logprobs, expected.gather(-1, ids[:, None])[:, 0], rtol=0, atol=1e-5)


def test_two_image_records_encoded_and_sampled_equal_the_reference(setup, tmp_path):
    # From records to tokens: an EasyR1-style record with two <image> tags, encoded by the
    # prompt encoder (two image blocks, two grids), sampled like the reference sampler.
    from r1vl.data.records import Example, load_image

    model, prompts, eos = setup
    one = prompts[0].example
    two = Example(image_path=None, problem="<image>" + one.problem + "<image>", solution="x",
                  images=(one.image_path, load_image(prompts[1].example.image_path)))
    tokenizer = build_tokenizer([one.problem], vocab_size=400)
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)
    prompt = encode_prompt(two, tokenizer, processor, 2, 56 * 56, 56 * 56)
    assert prompt.image_grid_thw.shape == (2, 3) and int((prompt.ids == model.config.image_token_id).sum()) == \
        int(prompt.image_grid_thw.prod(-1).sum()) // 4
    kwargs = dict(temperature=1e-6, generator=torch.Generator().manual_seed(0))
    fast = generate(model, [prompt, prompts[2]], 2, 8, eos, **kwargs)
    reference = generate_reference(model, [prompt, prompts[2]], 2, 8, eos, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(fast.ids, reference.ids))
