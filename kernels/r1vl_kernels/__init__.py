"""r1vl_kernels: fused GRPO loss kernels (Triton, with an eager PyTorch path for CPU).

Depends on torch and triton only, so any GRPO codebase can import it:

    from r1vl_kernels import grpo_loss, token_logprobs, group_advantages
    from r1vl_kernels import grpo_loss_from_hidden, token_logprobs_from_hidden  # lm_head fused
    from r1vl_kernels.trl import FusedGRPOTrainer  # TRL's GRPOTrainer on these (needs trl)

One module per op family, each imported only by those above it:
    logits     the loss from logits: kernels, launchers, custom ops, grpo_loss, token_logprobs
    hidden     the loss from hidden states, lm_head fused: the same for grpo_loss_from_hidden
    terms      the O(N) per-token terms: advantages and each token's loss term, the epilogue
    reference  the readable torch reference of every stage: the CPU path and the oracle
    options    the option and validation layer: argument checks, packed inputs, outputs
    registry   the op registry: the torch.library namespace and how ops are called
    trl        integrations: TRL's GRPOTrainer with the fused loss (imported on request)
"""
from .hidden import grpo_loss_from_hidden, token_logprobs_from_hidden
from .logits import grpo_loss, token_logprobs
from .options import GRPOLossOutput
from .terms import group_advantages

__all__ = ["GRPOLossOutput", "group_advantages", "grpo_loss", "grpo_loss_from_hidden", "token_logprobs",
           "token_logprobs_from_hidden"]
