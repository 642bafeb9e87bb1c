"""r1vl_kernels: fused GRPO loss kernels (Triton, with an eager PyTorch path for CPU).

Depends on torch and triton only, so any GRPO codebase can import it:

    from r1vl_kernels import grpo_loss, token_logprobs, group_advantages
"""
from .grpo_loss import GRPOLossOutput, group_advantages, grpo_loss, token_logprobs

__all__ = ["GRPOLossOutput", "group_advantages", "grpo_loss", "token_logprobs"]
