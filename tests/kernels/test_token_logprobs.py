"""token_logprobs against float64 log_softmax, packed and padded, with entropies."""
import pytest
import torch

from r1vl_kernels import token_logprobs

IMPLS = ("torch", "triton")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("temperature", (1.0, 0.6))
def test_matches_log_softmax(impl, dtype, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(37, 203, generator=g) * 3).to(dtype)
    target = torch.randint(0, 203, (37,), generator=g)
    logp, entropy = token_logprobs(logits, target, temperature, return_entropy=True, impl=impl)
    log_probs = torch.log_softmax(logits.double() / temperature, -1)
    assert logp.dtype == torch.float32 and logp.shape == (37,)
    torch.testing.assert_close(logp.double(), log_probs.gather(1, target[:, None]).squeeze(1), rtol=0, atol=2e-5)
    # fp32 sum of V terms p * z with |z| up to ~20: a few 1e-5 of rounding.
    torch.testing.assert_close(entropy.double(), -(log_probs.exp() * log_probs).sum(-1), rtol=0, atol=2e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_padded_view_is_read_in_place(impl, seed):
    """logits[:, :-1] of (B, L+1, V) cannot be viewed as rows; it must not need a copy."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(3, 6, 75, generator=g)
    target = torch.randint(0, 75, (3, 5), generator=g)
    logp = token_logprobs(full[:, :-1], target, impl=impl)
    expected = torch.log_softmax(full[:, :-1].double(), -1).gather(-1, target[..., None]).squeeze(-1)
    assert logp.shape == (3, 5)
    torch.testing.assert_close(logp.double(), expected, rtol=0, atol=2e-5)


def test_no_gradient_is_recorded():
    logits = torch.randn(4, 9, requires_grad=True)
    logp = token_logprobs(logits, torch.zeros(4, dtype=torch.long), impl="torch")
    assert not logp.requires_grad


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="target_ids must lie in"):
        token_logprobs(torch.randn(4, 9), torch.tensor([0, 1, 9, 2]))
    with pytest.raises(ValueError, match="target_ids must have shape"):
        token_logprobs(torch.randn(4, 9), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.randn(4, 9), torch.zeros(4, dtype=torch.long), temperature=0.0)
