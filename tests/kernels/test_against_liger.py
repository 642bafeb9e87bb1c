"""r1vl_kernels against Liger-Kernel, a second independent implementation, where the two
define the same thing: grpo_loss against triton_grpo_loss (Liger's padded (B, L+1, V)
layout; its Triton kernels run through the interpreter here, as ours do) and
grpo_loss_from_hidden against LigerFusedLinearGRPOLoss (chunked torch); loss and gradients."""
import itertools

import pytest
import torch

from r1vl_kernels import grpo_loss, grpo_loss_from_hidden

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


@pytest.mark.parametrize("loss_type,level,beta", CASES)
def test_from_hidden_matches_liger_fused_linear_grpo(loss_type, level, beta, seed):
    """grpo_loss_from_hidden against Liger's LigerFusedLinearGRPOLoss (chunked torch)."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    g = torch.Generator().manual_seed(seed)
    B, L, H, V = 3, 5, 12, 53
    hidden = torch.randn(B, L, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    target = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 3:] = 0
    current = torch.log_softmax(hidden @ weight.t() / 0.9, -1).gather(-1, target[..., None]).squeeze(-1)
    old = current + 0.3 * torch.randn(B, L, generator=g)
    ref = current + 0.3 * torch.randn(B, L, generator=g)
    adv = torch.randn(B, generator=g)

    theirs_leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    liger = LigerFusedLinearGRPOLoss(beta=beta, compiled=False, use_ref_model=beta != 0, epsilon_low=0.2,
                                     epsilon_high=0.28, loss_type=loss_type, max_completion_length=L,
                                     importance_sampling_level=level, temperature=0.9)
    theirs, _ = liger(theirs_leaves[0], theirs_leaves[1], target, mask, adv,
                      ref_per_token_logps=ref if beta else None, old_per_token_logps=old)
    theirs.backward()

    ours_leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    ours = grpo_loss_from_hidden(ours_leaves[0], ours_leaves[1], target, advantages=adv, old_logp=old,
                                 ref_logp=ref if beta else None, completion_mask=mask, temperature=0.9,
                                 beta=beta, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
                                 importance_sampling_level=level, max_completion_length=L, impl="triton")
    ours.loss.backward()
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours_leaves, theirs_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
