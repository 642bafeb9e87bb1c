"""The options of the O(N) loss epilogue (what happens to each token's log-prob once the
vocabulary or hidden-state pass has computed it), shared by its two implementations
(_triton_grpo.grpo_terms, _torch_impl.grpo_terms)."""
from dataclasses import dataclass
from typing import Optional

# The policy term of each loss type (TRL's GRPOTrainer._compute_loss, trl 1.16):
#   "clip"  -min(r A, clamp(r, 1 - eps_low, 1 + eps_high) A), r capped at delta if given
#   "cispo" -sg(min(r, eps_high)) A logp  (sg: no gradient through the ratio)
#   "sapo"  -sigmoid(tau (r - 1)) 4 / tau A, tau = tau_pos if A > 0 else tau_neg
#   "vespo" -sg(phi_s) A logp, phi_s = exp(lam + k log w - lam w) of the sequence's
#           w = exp(clamp(sum_t clamp(logp - old, -20, 20) + offset_s, log 1e-8, 20)),
#           (k, lam) = (k_pos, lambda_pos) if A >= 0 else (k_neg, lambda_neg)
POLICIES = ("clip", "cispo", "sapo", "vespo")
POLICY_OF_LOSS = {"grpo": "clip", "bnpo": "clip", "dr_grpo": "clip", "dapo": "clip", "luspo": "clip",
                  "cispo": "cispo", "sapo": "sapo", "vespo": "vespo"}
VESPO_LOG_W_MIN = -18.420680743952367  # log(1e-8), TRL's lower clamp of vespo's log-weights
PER_SEQ_MEAN_LOSSES = ("grpo", "sapo")  # each sequence's token mean, then the mean over sequences


@dataclass(frozen=True)
class TermsConfig:
    """Scalars of the epilogue. The reduction weight of a token of sequence s is
    inv_norm / n_s with per_seq_mean (grpo, sapo), else inv_norm."""
    eps_low: float
    eps_high: float
    delta: Optional[float]        # two-sided clipping cap of the ratio (clip policy only)
    beta: float                   # KL coefficient
    inv_norm: float
    per_seq_mean: bool
    seq_level: bool               # sequence-level importance ratio (GSPO)
    policy: str = "clip"          # one of POLICIES
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    off_policy_threshold: Optional[float] = None  # off-policy sequence mask (OPSM) if given
    bias_correction_kl: bool = False              # KL term multiplied by the importance ratio
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
