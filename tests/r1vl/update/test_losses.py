"""Loss normalization: micro-batches (and ranks) weighted by microbatch_weight and summed give
the gradient of the whole batch in one packed forward, for every loss type."""
import copy

import pytest
import torch
from tiny_qwen_vl import make_group, make_sequence, tiny_model

from r1vl.model.attention import use_varlen_attention
from r1vl.update.losses import completion_logprobs, kernel_impl, microbatch_weight, policy_loss
from r1vl.update.microbatches import plan_shared_microbatches
from r1vl.update.packing import pack

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _batch(seed: int, family: str = "qwen2_vl"):
    gen = torch.Generator().manual_seed(seed)
    sequences = []
    for prompt in range(3):  # 3 prompts x G=2, completions of uneven lengths
        first = make_sequence(gen, [(1, 4, 4)], completion_len=2 + 5 * prompt, family=family)
        second = make_sequence(gen, [(1, 4, 4)], completion_len=9 - 3 * prompt, pixel_values=first.pixel_values,
                             family=family)
        second.prompt_ids = first.prompt_ids
        sequences += [first, second]
    # Their own stream: the same advantages for every family (whose pixel rows draw differently).
    advantages = torch.randn(len(sequences), generator=torch.Generator().manual_seed(seed))
    return sequences, advantages


def _grads(model, sequences, advantages, parts, loss_type, ref_model, weighted=True):
    """Sum over `parts` (lists of sequence indices) of weighted micro-batch losses; returns the
    flat gradient. Global counts are over all parts, as the trainer all-reduces them."""
    model.zero_grad(set_to_none=True)
    S = len(sequences)
    N = sum(len(s.completion_ids) for s in sequences)
    for idx in parts:
        packed = pack([sequences[i] for i in idx], model)
        ref = completion_logprobs(ref_model, packed, 1.2, "torch")
        out = policy_loss(model, packed, advantages[idx], None, ref, impl="torch", temperature=1.2, beta=0.04,
                          loss_type=loss_type, max_completion_length=12, num_items_in_batch=N)
        weight = microbatch_weight(loss_type, len(idx), packed.target_ids.numel(), S, N) if weighted else 1.0
        (out.loss * weight).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_microbatches_and_ranks_sum_to_the_full_batch_gradient(loss_type):
    model = tiny_model("qwen2_vl", seed=0)
    use_varlen_attention(model)
    reference = copy.deepcopy(model)
    with torch.no_grad():  # a reference that differs from the policy, so the KL term matters
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sequences, advantages = _batch(seed=1)
    full = _grads(model, sequences, advantages, [list(range(6))], loss_type, reference)
    # Uneven micro-batches, as "rank 0" = [0, 1, 2] + [3] and "rank 1" = [4, 5]: the trainer
    # sums micro-batches and then ranks; the order of a sum does not matter.
    split = _grads(model, sequences, advantages, [[0, 1, 2], [3], [4, 5]], loss_type, reference)
    assert full.abs().max() > 0
    torch.testing.assert_close(split, full, rtol=1e-4, atol=1e-7)
    # The weights are load-bearing: an unweighted sum is a different gradient.
    if loss_type != "dapo":  # (dapo's weight is 1: it divides by the global count itself)
        unweighted = _grads(model, sequences, advantages, [[0, 1, 2], [3], [4, 5]], loss_type, reference, False)
        assert not torch.allclose(unweighted, full, rtol=1e-2)


def test_kernel_impl_never_defers_to_the_environment():
    assert kernel_impl("auto", torch.device("cpu")) == "torch"
    assert kernel_impl("auto", torch.device("cuda", 0)) == "triton"
    assert kernel_impl("triton", torch.device("cpu")) == "triton"


def test_reference_log_probs_see_the_image():
    """The public code computed the KL term without the image; here the reference scores the
    same packed batch as the policy, pixels included, so another image changes its log-probs."""
    model = tiny_model("qwen2_vl", seed=0)
    use_varlen_attention(model)
    sequences, _ = _batch(seed=2)
    other = [copy.copy(s) for s in sequences]
    for s in other:
        s.pixel_values = s.pixel_values.flip(0)
    same = completion_logprobs(model, pack(sequences, model), 1.0, "torch")
    flipped = completion_logprobs(model, pack(other, model), 1.0, "torch")
    assert same.shape == flipped.shape and not torch.allclose(same, flipped)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_step_advantages_over_ranks_equal_the_whole_batch(scale):
    """Rank 0 holds 3 groups of 4, rank 1 holds 2 and rank 2 none (all its prompts skipped):
    each rank's advantages equal the slice of those of the whole batch in one process."""
    from r1vl.rewards.advantages import step_advantages
    from r1vl_kernels import group_advantages

    gen = torch.Generator().manual_seed(7)
    shards = [torch.rand(12, generator=gen) * 2, torch.rand(8, generator=gen), torch.zeros(0)]
    whole = group_advantages(torch.cat(shards), 4, scale, impl="torch")

    def stats(r):
        r = r.double()
        return [r.numel(), float(r.sum()), float((r * r).sum())]

    offset = 0
    for shard in shards:
        def sum_over_ranks(values):  # what all_reduce_sum returns: every rank's values summed
            assert values == pytest.approx(stats(shard))
            return [sum(column) for column in zip(*map(stats, shards))]

        got = step_advantages(shard, 4, scale, sum_over_ranks)
        assert got.dtype == torch.float32 and got.shape == shard.shape
        torch.testing.assert_close(got, whole[offset: offset + shard.numel()], rtol=1e-6, atol=1e-6)
        offset += shard.numel()


def _perturbed(model, seed, scale=0.01):
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_shared_prompts_over_microbatches_give_the_unshared_loss_and_gradient(loss_type):
    """The trainer's path with share_prompts: plan_shared_microbatches (the largest group over
    the budget, so split and its prompt recomputed), reference and old log-probs on the
    shared batches, the weighted loss of each micro-batch. Against one unshared micro-batch:
    the same log-probs, loss and gradient of every parameter."""
    model = tiny_model("qwen2_5_vl", seed=3)
    use_varlen_attention(model)
    reference, old_model = _perturbed(model, 1), _perturbed(model, 2)
    gen = torch.Generator().manual_seed(4)
    sequences = []
    for grids, lens in [([(1, 4, 4)], [1, 9, 4, 12]), ([(1, 2, 6)], [7, 1, 3, 2]), ([], [5, 11, 1, 6])]:
        sequences += make_group(gen, grids, lens)
    advantages = torch.randn(len(sequences), generator=gen)
    S, N = len(sequences), sum(len(s.completion_ids) for s in sequences)
    options = dict(impl="torch", temperature=1.2, beta=0.04, loss_type=loss_type, max_completion_length=12,
                   num_items_in_batch=N)

    shared_batches = []

    def update(parts, share):
        model.zero_grad(set_to_none=True)
        total, logps = 0.0, []
        for idx in parts:
            packed = pack([sequences[i] for i in idx], model, share_prompts=share)
            ref = completion_logprobs(reference, packed, 1.2, "torch")
            old = completion_logprobs(old_model, packed, 1.2, "torch")
            out = policy_loss(model, packed, advantages[idx], old, ref, **options)
            loss = out.loss * microbatch_weight(loss_type, len(idx), packed.target_ids.numel(), S, N)
            loss.backward()
            total += float(loss.detach())
            logps.append((idx, ref, old, out.logp.detach()))
            shared_batches.append(packed.shares_prompts)
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        return total, logps, grads

    group_totals = [len(sequences[4 * g].prompt_ids) + sum(len(s.completion_ids) for s in sequences[4 * g: 4 * g + 4])
                    for g in range(3)]
    plan = plan_shared_microbatches(sequences, max(group_totals) - 1)
    assert plan.split_groups == 1 and len(plan.microbatches) >= 2
    loss, logps, grads = update(plan.microbatches, share=True)
    assert shared_batches.count(True) >= 2  # (a part of one completion is an unshared sequence)
    expected_loss, ((_, *expected), ), expected_grads = update([list(range(S))], share=False)

    cu = torch.tensor([0] + [len(s.completion_ids) for s in sequences]).cumsum(0).tolist()
    for idx, *got in logps:  # reference, old and policy log-probs of each micro-batch's sequences
        rows = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in idx])
        for name, g, e in zip(("ref", "old", "policy"), got, expected):
            torch.testing.assert_close(g, e[rows], atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")
    assert loss == pytest.approx(expected_loss, rel=1e-4, abs=1e-6)
    assert expected_grads.abs().max() > 0 and all(p.grad is not None for p in model.parameters())
    torch.testing.assert_close(grads, expected_grads, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family,tied", [("qwen2_vl", False), ("qwen3_vl", False), ("qwen3_vl", True)])
@pytest.mark.parametrize("with_old", [False, True])
def test_float64_softmax_loss_matches_the_kernels(with_old, family, tied):
    """--loss_softmax float64 (the eager float64 form over lm_head's logits, a numerics check)
    gives the fused kernels' loss, log-probs, KL, entropy, clip fractions and gradient up to
    float32 rounding; tied: the lm_head is the input embedding (the small Qwen3-VL models), so
    its gradient sums the loss's and the embedding lookup's."""
    model = tiny_model(family, seed=3, tie_word_embeddings=tied)
    use_varlen_attention(model, "sdpa")
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sequences, advantages = _batch(7, family)
    packed = pack(sequences, model)
    ref = completion_logprobs(ref_model, packed, 1.2, "torch")
    old = None
    if with_old:  # ratios away from 1, some clipped on either side
        old = completion_logprobs(model, packed, 1.2, "torch") + 0.4 * torch.randn(ref.shape)
    outs, grads = [], []
    for softmax in ("float32", "float64"):
        model.zero_grad(set_to_none=True)
        out = policy_loss(model, packed, advantages, old, ref, impl="torch", softmax=softmax, temperature=1.2,
                          beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="grpo",
                          max_completion_length=12, num_items_in_batch=packed.target_ids.numel())
        out.loss.backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    fused, exact = outs
    assert exact.loss.dtype == torch.float32 and exact.loss.requires_grad
    torch.testing.assert_close(exact.loss, fused.loss, atol=1e-6, rtol=1e-5)
    for name in ("logp", "kl", "entropy", "clip_low_frac", "clip_high_frac"):
        torch.testing.assert_close(getattr(exact, name), getattr(fused, name), atol=1e-5, rtol=1e-5)
    if with_old:
        assert float(fused.clip_low_frac) > 0 and float(fused.clip_high_frac) > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="loss_type grpo only"):
        policy_loss(model, packed, advantages, None, ref, impl="torch", softmax="float64", temperature=1.2,
                    beta=0.0, epsilon_low=0.2, epsilon_high=0.2, loss_type="bnpo")


def test_logprob_pass_builds_no_graph_under_activation_checkpointing():
    """The old / reference log-prob pass runs without gradient even with the policy in train
    mode and --activation_checkpointing on (the trainer's state during the update): no layer
    goes through the checkpoint function and the result holds no graph. With gradients on,
    every checkpointed layer (2 decoder layers, 1 vision block) would be checkpointed, and the
    graph and saved layer inputs kept alive for a backward that never comes."""
    from r1vl.model.activation_checkpointing import checkpointed_layers, enable_activation_checkpointing

    model = tiny_model("qwen2_vl", seed=0)
    use_varlen_attention(model)
    enable_activation_checkpointing(model)
    model.train()
    calls = []
    for layer in checkpointed_layers(model):
        def counted(*args, _inner=layer._gradient_checkpointing_func, **kwargs):
            calls.append(1)
            return _inner(*args, **kwargs)
        layer._gradient_checkpointing_func = counted
    samples, _ = _batch(seed=2)
    packed = pack(samples, model)
    logp = completion_logprobs(model, packed, 1.2, "torch")
    assert logp.shape == (packed.target_ids.numel(),)
    assert not logp.requires_grad and logp.grad_fn is None
    assert len(calls) == 0, f"{len(calls)} checkpoint calls in a no-gradient pass"
    # The counter does see checkpointing: the loss's forward goes through every layer's.
    policy_loss(model, packed, torch.zeros(len(samples)), None, None, impl="torch", temperature=1.2, beta=0.0,
                loss_type="grpo", max_completion_length=12)
    assert len(calls) == len(checkpointed_layers(model)) == 3
