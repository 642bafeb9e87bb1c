"""The GRPO loss as TRL's GRPOTrainer computes it in eager PyTorch: the baseline to beat.

Padded (B, L, V) logits: divide by the temperature (a copy), per-token log-probs through a
log-softmax (row by row for half precision, as TRL's selective_log_softmax does to bound its
memory), then the clipped-ratio loss (token- or sequence-level ratios), the k3 KL and the
"grpo" reduction.
"""
import torch


def selective_log_softmax(logits, index):
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        return picked - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return torch.stack([
        torch.log_softmax(row, dim=-1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
        for row, idx in zip(logits, index)
    ])


def trl_grpo_loss(logits, target_ids, mask, advantages, old_logp, ref_logp, *, temperature=1.0,
                  beta=0.04, epsilon_low=0.2, epsilon_high=0.2, importance_sampling_level="token"):
    """logits (B, L, V); target_ids, mask, old_logp, ref_logp (B, L); advantages (B,).
    importance_sampling_level "sequence" (GSPO): one ratio per sequence, exp of the masked
    mean of logp - old_logp."""
    logp = selective_log_softmax(logits / temperature, target_ids)
    log_ratio = logp - old_logp
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * (torch.exp(ref_logp - logp) - (ref_logp - logp) - 1)
    return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
