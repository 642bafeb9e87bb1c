"""r1vl_kernels: fused GRPO loss kernels (Triton, with an eager PyTorch path for CPU).

Depends on torch and triton only, so any GRPO codebase can import it:

    from r1vl_kernels import grpo_loss, token_logprobs, group_advantages
    from r1vl_kernels import grpo_loss_from_hidden, token_logprobs_from_hidden  # lm_head fused
    from r1vl_kernels.trl import FusedGRPOTrainer  # TRL's GRPOTrainer on these (needs trl)
"""
from .grpo_loss import GRPOLossOutput, group_advantages, grpo_loss, token_logprobs
from .grpo_loss_from_hidden import grpo_loss_from_hidden, token_logprobs_from_hidden

__all__ = ["GRPOLossOutput", "group_advantages", "grpo_loss", "grpo_loss_from_hidden", "token_logprobs",
           "token_logprobs_from_hidden"]
