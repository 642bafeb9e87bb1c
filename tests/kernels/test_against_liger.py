"""grpo_loss against Liger-Kernel's triton_grpo_loss, a second independent implementation,
where the two define the same thing: the padded (B, L+1, V) layout Liger takes, reduced loss
and dlogits. Liger's Triton kernels run through the interpreter here, as ours do."""
import itertools

import pytest
import torch

from r1vl_kernels import grpo_loss

liger_grpo = pytest.importorskip("liger_kernel.transformers.grpo_loss")

CASES = list(itertools.product(("grpo", "bnpo", "dr_grpo", "dapo"), ("token", "sequence"), (0.0, 0.04)))


@pytest.mark.parametrize("loss_type,level,beta", CASES)
def test_matches_liger_triton_grpo_loss(loss_type, level, beta, seed):
    g = torch.Generator().manual_seed(seed)
    B, L, V = 3, 6, 97
    logits = torch.randn(B, L + 1, V, generator=g) * 2
    target = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    current = torch.log_softmax(logits[:, :-1] / 0.9, -1).gather(-1, target[..., None]).squeeze(-1)
    old = current + 0.3 * torch.randn(B, L, generator=g)
    ref = current + 0.3 * torch.randn(B, L, generator=g)
    adv = torch.randn(B, generator=g)
    common = dict(temperature=0.9, beta=beta, loss_type=loss_type, importance_sampling_level=level,
                  max_completion_length=L)

    theirs_leaf = logits.clone().requires_grad_()
    theirs, _ = liger_grpo.triton_grpo_loss(
        theirs_leaf, old, ref if beta else None, target, adv, mask, eps_low=0.2, eps_high=0.28,
        inplace=False, reduce=True, **common)
    theirs.backward()

    ours_leaf = logits.clone().requires_grad_()
    ours = grpo_loss(ours_leaf[:, :-1], target, advantages=adv, old_logp=old,
                     ref_logp=ref if beta else None, completion_mask=mask, epsilon_low=0.2,
                     epsilon_high=0.28, impl="triton", **common)
    ours.loss.backward()

    torch.testing.assert_close(ours.loss, theirs.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_leaf.grad, theirs_leaf.grad, rtol=1e-4, atol=1e-6)
