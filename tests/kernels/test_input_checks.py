"""Bad input gets a ValueError that names what is wrong, before any kernel runs."""
import pytest
import torch

from r1vl_kernels import group_advantages, grpo_loss


def packed(N=6, V=11, S=2):
    logits = torch.randn(N, V)
    target = torch.randint(0, V, (N,))
    cu = torch.tensor([0, 2, N], dtype=torch.int32)
    return logits, target, cu, torch.randn(S)


@pytest.mark.parametrize("change,match", [
    (dict(logits=torch.randn(6, 11, dtype=torch.float64)), "logits must be float32, bfloat16 or float16"),
    (dict(logits=torch.randn(6, 22)[:, ::2]), "unit stride"),
    (dict(logits=torch.randn(6)), "logits must have at least 2 dimensions"),
    (dict(target=torch.randint(0, 11, (5,))), "target_ids must have shape"),
    (dict(target=torch.tensor([0, 1, 2, 11, 4, 5])), r"target_ids must lie in \[0, V=11\)"),
    (dict(target=torch.tensor([0, 1, -1, 3, 4, 5])), "target_ids must lie in"),
    (dict(target=torch.zeros(6)), "target_ids must be an integer tensor"),
    (dict(cu=torch.tensor([0, 2, 6], dtype=torch.int64)), "cu_seqlens must be int32"),
    (dict(cu=torch.tensor([1, 2, 6], dtype=torch.int32)), "cu_seqlens must start at 0"),
    (dict(cu=torch.tensor([0, 2, 5], dtype=torch.int32)), "cu_seqlens must end at N=6"),
    (dict(cu=torch.tensor([0, 4, 2, 6], dtype=torch.int32), adv=torch.randn(3)), "non-decreasing"),
    (dict(cu=torch.tensor([0], dtype=torch.int32)), r"cu_seqlens must be 1-D \(S\+1,\)"),
    (dict(cu=None), "need cu_seqlens"),
    (dict(adv=torch.randn(3)), r"advantages must have shape \(2,\)"),
    (dict(adv=None), "give exactly one of advantages or rewards"),
    (dict(old=torch.randn(5)), r"old_logp must have shape \(6,\)"),
    (dict(ref=torch.randn(6, 1), beta=0.04), r"ref_logp must have shape \(6,\)"),
    (dict(beta=0.04), "beta=0.04 needs ref_logp"),
    (dict(loss_type="ppo"), "loss_type must be one of"),
    (dict(importance_sampling_level="seq"), "importance_sampling_level must be one of"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(epsilon_low=-0.1), "epsilon_low must be >= 0"),
    (dict(delta=0.0), "delta must be None or > 0"),
    (dict(impl="cuda"), "impl must be None, 'triton' or 'torch'"),
    (dict(num_items_in_batch=0, loss_type="dapo"), "num_items_in_batch must be > 0"),
    (dict(max_completion_length=0, loss_type="dr_grpo"), "max_completion_length must be >= 1"),
])
def test_bad_argument_is_named(change, match):
    logits, target, cu, adv = packed()
    args = dict(logits=logits, target=target, cu=cu, adv=adv, old=None, ref=None)
    kwargs = {}
    for key, value in change.items():
        (args if key in args else kwargs)[key] = value
    with pytest.raises(ValueError, match=match):
        grpo_loss(args["logits"], args["target"], args["cu"], args["adv"], args["old"], args["ref"], **kwargs)


def test_rewards_and_group_size_errors():
    logits, target, cu, adv = packed()
    rewards = torch.tensor([1.0, 0.0])
    with pytest.raises(ValueError, match="give exactly one of advantages or rewards"):
        grpo_loss(logits, target, cu, adv, rewards=rewards, group_size=2)
    with pytest.raises(ValueError, match="rewards need group_size"):
        grpo_loss(logits, target, cu, rewards=rewards)
    with pytest.raises(ValueError, match="group_size=3 does not divide the number of sequences S=2"):
        grpo_loss(logits, target, cu, rewards=rewards, group_size=3)
    with pytest.raises(ValueError, match="group_size is only used with rewards"):
        grpo_loss(logits, target, cu, adv, group_size=2)
    with pytest.raises(ValueError, match="scale_rewards='group' needs group_size >= 2"):
        grpo_loss(logits, target, cu, rewards=rewards, group_size=1)
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        grpo_loss(logits, target, cu, rewards=rewards, group_size=2, scale_rewards="std")


def test_layout_errors():
    logits, target, cu, adv = packed()
    with pytest.raises(ValueError, match="packed logits .* take cu_seqlens, not completion_mask"):
        grpo_loss(logits, target, cu, adv, completion_mask=torch.ones(6))
    padded = torch.randn(2, 3, 11)
    target = torch.randint(0, 11, (2, 3))
    with pytest.raises(ValueError, match="padded logits .* take completion_mask, not cu_seqlens"):
        grpo_loss(padded, target, cu, adv)
    with pytest.raises(ValueError, match=r"completion_mask must be a tensor of shape \(2, 3\)"):
        grpo_loss(padded, target, advantages=adv, completion_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="completion_mask must hold only 0 and 1"):
        grpo_loss(padded, target, advantages=adv, completion_mask=torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="inplace_backward needs contiguous padded logits"):
        grpo_loss(torch.randn(2, 4, 11)[:, :-1], target, advantages=adv, inplace_backward=True)
    with pytest.raises(ValueError, match=r"logits must be \(N, V\) packed or \(B, L, V\) padded"):
        grpo_loss(torch.randn(1, 2, 3, 11), target, advantages=adv)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="rewards must be a 1-D floating-point tensor"):
        group_advantages(torch.ones(2, 2), 2)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        group_advantages(torch.ones(4), 0)
    with pytest.raises(ValueError, match="group_size=3 does not divide"):
        group_advantages(torch.ones(4), 3)
    with pytest.raises(ValueError, match="scale_rewards='batch' needs at least 2 rewards"):
        group_advantages(torch.ones(1), 1, scale_rewards="batch")


def test_impl_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits, target, cu, adv = packed()
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1"):
        grpo_loss(logits, target, cu, adv, impl="triton")
