"""Inverse-CDF sampling: the token the uniform falls on, never a zero-probability one, the
nucleus, and the log-probabilities of the unmodified softmax."""
import pytest
import torch

from r1vl.sampling.draw import sample_tokens


def test_token_is_where_the_uniform_falls_in_the_cdf():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    cases = {0.0: 0, 0.099: 0, 0.1001: 1, 0.29: 1, 0.31: 2, 0.599: 2, 0.61: 3, 0.999999: 3}
    for u, expected in cases.items():
        token, _ = sample_tokens(logits, torch.tensor([u]), 1.0, 1.0)
        assert int(token) == expected, u


def test_banned_and_zero_probability_tokens_are_never_drawn():
    # The last token is banned: even a uniform just below 1 (where rounding of u * total could
    # reach the end of the cdf) lands on an allowed token.
    logits = torch.tensor([[0.0, -1e9, 1.0, 2.0, 5.0]]).expand(6, -1)
    uniforms = torch.tensor([0.0, 0.3, 0.5, 0.9, 1 - 2**-24, 0.99999])
    tokens, _ = sample_tokens(logits, uniforms, 1.0, 1.0, banned=torch.tensor([4]))
    assert not (tokens == 4).any() and not (tokens == 1).any()
    assert int(tokens[4]) == 3


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    u = torch.linspace(0, 0.999, 200)
    tokens, _ = sample_tokens(probs.log().expand(200, -1), u, 1.0, 0.75)
    assert set(tokens.tolist()) == {1, 2}  # 0.5 < 0.75 <= 0.5 + 0.3
    # The kept tokens share the mass in proportion: 0.5 : 0.3.
    assert abs(float((tokens == 1).float().mean()) - 0.5 / 0.8) < 0.01
    tokens, _ = sample_tokens(probs.log(), torch.tensor([0.9]), 1.0, 1e-6)
    assert int(tokens) == 1  # the top token always stays


def test_logprobs_are_the_tempered_softmax_over_the_whole_vocabulary():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 11, generator=gen) * 3
    tokens, logprobs = sample_tokens(logits, torch.rand(5, generator=gen), 0.7, 0.9, banned=torch.tensor([2, 3]))
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs, expected)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_draws_follow_the_tempered_softmax(temperature):
    """Frequencies, not only log-probabilities, at a temperature other than 1 (where T and
    T squared would agree): uniforms on a fine grid land on each token in proportion to
    softmax(logits / T), with or without a nucleus that keeps everything."""
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5]])
    n = 20000
    u = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    expected = torch.softmax(logits[0] / temperature, -1)
    for top_p in (1.0, 0.999999):
        tokens, _ = sample_tokens(logits.expand(n, -1), u, temperature, top_p)
        freq = torch.bincount(tokens, minlength=5).float() / n
        torch.testing.assert_close(freq, expected, atol=2.0 / n, rtol=0)
