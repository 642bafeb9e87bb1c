"""The loss inside torch.compile graphs: the kernels are custom ops, opaque to the compiler,
with fake kernels for tracing and an autograd rule (Liger #1366 broke on a compiled
kernel's hyper-parameters; here they stay Python floats handed to the launch)."""
import pytest
import torch

from r1vl_kernels import grpo_loss


@pytest.mark.parametrize("impl", ("torch", "triton"))
@pytest.mark.parametrize("backend", ("aot_eager", "inductor"))
def test_compiled_loss_and_gradient_match_eager(impl, backend, seed):
    g = torch.Generator().manual_seed(seed)
    N, V, S = 19, 83, 3
    weight = torch.randn(V, 16, generator=g) * 0.3
    hidden = torch.randn(N, 16, generator=g)
    target = torch.randint(0, V, (N,), generator=g)
    cu = torch.tensor([0, 1, 12, N], dtype=torch.int32)
    adv = torch.randn(S, generator=g)
    ref = torch.randn(N, generator=g) * 0.1 - 4.5

    def step(hidden, weight):
        logits = (hidden @ weight.t()) * 1.5  # compiled code around the custom op
        out = grpo_loss(logits, target, cu, adv, ref_logp=ref, beta=0.04, temperature=0.8,
                        loss_type="dr_grpo", max_completion_length=11, impl=impl)
        return out.loss

    results = []
    for fn in (step, torch.compile(step, backend=backend, fullgraph=True)):
        w = weight.clone().requires_grad_()
        loss = fn(hidden, w)
        loss.backward()
        results.append((loss.detach(), w.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)
