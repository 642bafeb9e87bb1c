"""GPU check of the epilogue's options (cispo, sapo, luspo, vespo; the per-token policy weight,
the off-policy mask, the bias-corrected KL): the compiled Triton kernels against the eager torch
implementation on the same device, from hidden states at a real shape. Skipped without a GPU."""
import pytest
import torch

from r1vl_kernels import grpo_loss_from_hidden, token_logprobs_from_hidden

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("loss_type,level", [("cispo", "token"), ("sapo", "sequence"), ("luspo", "sequence"),
                                             ("vespo", "token"), ("grpo", "token")])
def test_triton_matches_torch_with_every_option(loss_type, level, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    N, H, V, S = 4099, 1024, 32771, 29
    hidden = torch.randn(N, H, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(V, H, device="cuda", generator=g) * 0.05).bfloat16()
    target = torch.randint(0, V, (N,), device="cuda", generator=g)
    cuts = torch.sort(torch.randint(0, N + 1, (S - 1,), device="cuda", generator=g)).values
    cu = torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), N)]).to(torch.int32)
    logp = token_logprobs_from_hidden(hidden, weight, target, impl="torch")
    old = logp + 0.2 * torch.randn(N, device="cuda", generator=g)
    kw = dict(advantages=torch.randn(S, device="cuda", generator=g), old_logp=old,
              ref_logp=logp + 0.2 * torch.randn(N, device="cuda", generator=g), beta=0.04,
              loss_type=loss_type, importance_sampling_level=level, epsilon_high=4.0 if loss_type == "cispo" else 0.28,
              policy_weight=torch.rand(N, device="cuda", generator=g) * 1.5, off_policy_threshold=0.02,
              sampling_logp=old + 0.2 * torch.randn(N, device="cuda", generator=g), bias_correction_kl=True)
    results = {}
    for impl in ("torch", "triton"):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight)]
        out = grpo_loss_from_hidden(leaves[0], leaves[1], target, cu, impl=impl, **kw)
        out.loss.backward()
        results[impl] = [out.loss, out.kl] + [leaf.grad.float() for leaf in leaves]
    for name, a, b in zip(("loss", "kl", "dhidden", "dweight"), results["triton"], results["torch"]):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 1e-2 * scale + 1e-6, name
