"""An independent float64 reference of the GRPO loss, written the way TRL computes it.

Dense and padded: (B, L, V) logits, a (B, L) mask, autograd for the gradient. It shares no
code with r1vl_kernels; tests compare both implementations of the package against it.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Reference:
    loss: torch.Tensor        # () float64, differentiable
    logp: torch.Tensor        # (B, L) float64
    kl: torch.Tensor          # (B, L) float64
    clip_low_frac: float
    clip_high_frac: float
    entropy: torch.Tensor     # (B, L) float64


def advantages_like_trl(rewards, group_size: int, scale_rewards: str, eps: float = 1e-4):
    r = rewards.double()
    mean = r.view(-1, group_size).mean(dim=1).repeat_interleave(group_size)
    adv = r - mean
    if scale_rewards == "group":
        adv = adv / (r.view(-1, group_size).std(dim=1).repeat_interleave(group_size) + eps)
    elif scale_rewards == "batch":
        adv = adv / (r.std() + eps)
    return adv


def grpo_loss_like_trl(
    logits, target_ids, mask, advantages, old_logp: Optional[torch.Tensor],
    ref_logp: Optional[torch.Tensor], *, temperature: float, beta: float, epsilon_low: float,
    epsilon_high: float, delta: Optional[float], loss_type: str, importance_sampling_level: str,
    max_completion_length: int, num_items_in_batch: Optional[float] = None,
    policy_weight: Optional[torch.Tensor] = None, off_policy_threshold: Optional[float] = None,
    sampling_logp: Optional[torch.Tensor] = None, bias_correction_kl: bool = False,
    sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0, vespo_log_offset: Optional[torch.Tensor] = None,
) -> Reference:
    """logits (B, L, V) float64 leaf; target_ids (B, L); mask (B, L) 0/1; advantages (B,);
    policy_weight, sampling_logp (B, L) or None. Follows trl 1.16's _compute_loss."""
    mask = mask.double()
    scaled = logits / temperature
    log_probs = torch.log_softmax(scaled, dim=-1)
    logp = log_probs.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
    old = logp.detach() if old_logp is None else old_logp.double()
    log_ratio = logp - old
    if importance_sampling_level == "token":
        log_weights = log_ratio
    else:
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_weights)
    adv = advantages.double().unsqueeze(1)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        ref = ref_logp.double()
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        if bias_correction_kl:
            kl = kl * coef_1
    if loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=epsilon_high).detach() * adv * logp
        low = torch.zeros_like(logp, dtype=torch.bool)
        high = (coef_1 > epsilon_high) & (adv > 0)
    elif loss_type == "vespo":
        with torch.no_grad():
            log_w = ((logp - old).clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
            if vespo_log_offset is not None:
                log_w = log_w + vespo_log_offset.double().unsqueeze(1)
            log_w = log_w.clamp(math.log(1e-8), 20.0)
            k = torch.where(adv >= 0, vespo_k_pos, vespo_k_neg)
            lam = torch.where(adv >= 0, vespo_lambda_pos, vespo_lambda_neg).clamp(min=1e-4)
            phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        per_token_loss = -phi * adv * logp
        low = high = torch.zeros_like(logp, dtype=torch.bool)
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token_loss = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * adv
        low = high = torch.zeros_like(logp, dtype=torch.bool)
    else:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
        low = (coef_1 < 1 - epsilon_low) & (adv < 0)
        high = (coef_1 > 1 + epsilon_high) & (adv > 0)
    if off_policy_threshold is not None:
        sampling = old if sampling_logp is None else sampling_logp.double()
        drift = torch.nan_to_num(sampling - logp.detach(), nan=0.0)
        seq_drift = (drift * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
        per_token_loss = per_token_loss * ((adv >= 0) | (seq_drift <= off_policy_threshold)).double()
    if policy_weight is not None:
        per_token_loss = per_token_loss * policy_weight.double()
    if ref_logp is not None and beta != 0.0:
        per_token_loss = per_token_loss + beta * kl

    if loss_type in ("grpo", "sapo"):
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    elif loss_type == "luspo":
        loss = (per_token_loss * mask).sum(-1).mean()
    elif loss_type in ("dapo", "cispo", "vespo"):
        normalizer = mask.sum().clamp(min=1.0) if num_items_in_batch is None else num_items_in_batch
        loss = (per_token_loss * mask).sum() / normalizer
    else:
        raise ValueError(loss_type)

    low, high = low.expand_as(logp).double(), high.expand_as(logp).double()
    n = mask.sum().clamp(min=1.0)
    probs = torch.softmax(scaled, dim=-1)
    entropy = -(probs * log_probs).sum(-1)
    return Reference(loss=loss, logp=logp.detach(), kl=kl.detach(),
                     clip_low_frac=((low * mask).sum() / n).item(),
                     clip_high_frac=((high * mask).sum() / n).item(), entropy=entropy.detach())


# ----------------------------------------------------------------------------- layouts


def pack_to_padded(x_packed, cu_seqlens, fill=0.0):
    """(N, ...) packed rows -> (S, L, ...) padded with `fill`, and the (S, L) 0/1 mask."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    S, L = len(lens), max(max(lens), 1)
    out = torch.full((S, L) + tuple(x_packed.shape[1:]), fill, dtype=x_packed.dtype, device=x_packed.device)
    mask = torch.zeros(S, L, dtype=torch.long, device=x_packed.device)
    for s, (start, n) in enumerate(zip(cu_seqlens[:-1].tolist(), lens)):
        out[s, :n] = x_packed[start:start + n]
        mask[s, :n] = 1
    return out, mask


def padded_to_packed(x_padded, mask):
    return x_padded[mask.bool()]
