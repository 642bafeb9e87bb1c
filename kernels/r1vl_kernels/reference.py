"""The readable torch reference: eager PyTorch for every stage the Triton kernels compute,
with the same contracts as their launchers (logits.py, hidden.py, terms.py).

It is the path for CPU tensors (impl="torch") and the plain statement of what the kernels
compute; it never imports them. The sweeps go through the logits, or through hidden x weight,
in chunks, so the fp32 working copies stay bounded (about 64 MB a chunk of logits rows; a
TOKEN_CHUNK x VOCAB_CHUNK block from hidden states) instead of N x V.
"""
import torch

from .options import VESPO_LOG_W_MIN, TermsConfig

_CHUNK_ELEMENTS = 1 << 24  # fp32 elements of logits processed at once


def _rows_per_chunk(V: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(V, 1))


def _gather_rows(logits, row_off):
    """fp32 copy of the rows at element offsets row_off (n,) int64 of logits (..., V)."""
    V = logits.shape[-1]
    flat = logits.as_strided((logits.untyped_storage().nbytes() // logits.element_size(),), (1,), 0)
    index = row_off[:, None] + logits.storage_offset() + torch.arange(V, device=logits.device)
    return flat[index].float()


# ----------------------------------------------------------------------------- vocabulary sweeps (from logits)


def logprob_fwd(logits, target_ids, row_off, temperature: float, with_entropy: bool):
    """Same contract as logits.logprob_fwd."""
    N, V = target_ids.shape[0], logits.shape[-1]
    logp = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
    step = _rows_per_chunk(V)
    for start in range(0, N, step):
        stop = min(start + step, N)
        rows = logits[start:stop] if row_off is None else _gather_rows(logits, row_off[start:stop])
        z = rows.float() / temperature  # out of place: rows may be the caller's fp32 logits
        lse_c = torch.logsumexp(z, dim=-1)
        lse[start:stop] = lse_c
        logp[start:stop] = z.gather(1, target_ids[start:stop, None]).squeeze(1) - lse_c
        if with_entropy:
            p = torch.exp(z - lse_c[:, None])
            # p * z with p = 0 and z = -inf (masked vocabulary) counts as 0, not nan.
            entropy[start:stop] = lse_c - torch.where(p > 0, p * z, 0.0).sum(-1)
    return logp, lse, entropy


def logprob_bwd(logits, target_ids, lse, dlogp, grad_out, row_off, tok_of_row,
                temperature: float, out):
    """Same contract as logits.logprob_bwd."""
    R, V = out.shape
    step = _rows_per_chunk(V)
    coef_tok = dlogp * (grad_out.float() / temperature)
    for start in range(0, R, step):
        stop = min(start + step, R)
        if tok_of_row is None:
            tok = torch.arange(start, stop, device=out.device)
            z = logits[start:stop]
            coef = coef_tok[start:stop]
        else:  # rows without a token (-1) read token 0's row and get a zero coefficient
            tok_or_none = tok_of_row[start:stop]
            tok = tok_or_none.clamp(min=0)
            z = _gather_rows(logits, row_off[tok])
            coef = torch.where(tok_or_none >= 0, coef_tok[tok], 0.0)
        p = torch.exp(z.float() / temperature - lse[tok, None])
        grad = p.neg_()
        grad.scatter_add_(1, target_ids[tok, None], torch.ones_like(grad[:, :1]))
        out[start:stop] = grad.mul_(coef[:, None]).to(out.dtype)
    return out


# ----------------------------------------------------------------------------- sweeps from hidden states


# Chunks of the sweeps over hidden x weight: the fp32 working set is TOKEN_CHUNK x VOCAB_CHUNK
# (32 MB with the defaults); N x V logits are never held.
TOKEN_CHUNK, VOCAB_CHUNK = 1024, 8192


def _hidden_logits(h, weight, bias, v0, v1, temperature):
    """fp32 (n, v1 - v0) logits / T of fp32 hidden rows h against vocabulary rows v0:v1."""
    z = h @ weight[v0:v1].float().t()
    if bias is not None:
        z += bias[v0:v1].float()
    return z.div_(temperature)


def logprob_fwd_from_hidden(hidden, weight, bias, target_ids, temperature: float, with_entropy: bool):
    """Same contract as hidden.logprob_fwd_from_hidden."""
    N, V = hidden.shape[0], weight.shape[0]
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
    for n0 in range(0, N, TOKEN_CHUNK):
        n1 = min(n0 + TOKEN_CHUNK, N)
        h, target = hidden[n0:n1].float(), target_ids[n0:n1]
        m = torch.full((n1 - n0,), float("-inf"), device=hidden.device)
        s, w, z_target = torch.zeros_like(m), torch.zeros_like(m), torch.zeros_like(m)
        for v0 in range(0, V, VOCAB_CHUNK):
            v1 = min(v0 + VOCAB_CHUNK, V)
            z = _hidden_logits(h, weight, bias, v0, v1, temperature)
            m_new = torch.maximum(m, z.max(dim=1).values)
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            alpha = torch.exp(m - m_safe)
            e = torch.exp(z - m_safe[:, None])
            s = s * alpha + e.sum(1)
            if with_entropy:
                w = w * alpha + (e * torch.where(e > 0, z, 0.0)).sum(1)
            inside = (target >= v0) & (target < v1)
            picked = z.gather(1, (target - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
            z_target += torch.where(inside, picked, 0.0)
            m = m_new
        m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        lse_c = m_safe + torch.log(s)
        lse[n0:n1] = lse_c
        logp[n0:n1] = z_target - lse_c
        if with_entropy:
            entropy[n0:n1] = lse_c - w / s
    return logp, lse, entropy


def grad_from_hidden(hidden, weight, bias, target_ids, lse, dlogp, grad_out, temperature: float):
    """Same contract as hidden.grad_from_hidden (dhidden in fp32 here; the op casts it)."""
    N, H = hidden.shape
    V = weight.shape[0]
    dhidden = torch.zeros(N, H, dtype=torch.float32, device=hidden.device)
    dweight = torch.zeros(V, H, dtype=torch.float32, device=hidden.device)
    dbias = torch.zeros(V, dtype=torch.float32, device=hidden.device) if bias is not None else None
    coef_all = dlogp * (grad_out.float() / temperature)
    for n0 in range(0, N, TOKEN_CHUNK):
        n1 = min(n0 + TOKEN_CHUNK, N)
        coef = coef_all[n0:n1]
        if not bool((coef != 0).any()):
            continue  # zero advantage and no KL: no gradient from these tokens
        h, target = hidden[n0:n1].float(), target_ids[n0:n1]
        for v0 in range(0, V, VOCAB_CHUNK):
            v1 = min(v0 + VOCAB_CHUNK, V)
            d = torch.exp(_hidden_logits(h, weight, bias, v0, v1, temperature) - lse[n0:n1, None]).neg_()
            inside = (target >= v0) & (target < v1)
            d.scatter_add_(1, (target - v0).clamp(0, v1 - v0 - 1)[:, None], inside.float()[:, None])
            d.mul_(coef[:, None])  # the per-token factor before any reduction over tokens
            dhidden[n0:n1] += d @ weight[v0:v1].float()
            dweight[v0:v1] += d.t() @ h
            if dbias is not None:
                dbias[v0:v1] += d.sum(0)
    return dhidden, dweight, dbias


# ----------------------------------------------------------------------------- O(N) terms


def group_advantages(rewards, group_size: int, scale_rewards: str, eps: float):
    """Same contract as terms.launch_group_advantages."""
    grouped = rewards.view(-1, group_size)
    adv = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "group":
        adv = adv / (grouped.std(dim=1).repeat_interleave(group_size) + eps)
    elif scale_rewards == "batch":
        adv = adv / (rewards.std() + eps)
    return adv


def grpo_terms(logp, old_logp, ref_logp, advantages, cu_seqlens, policy_weight, sampling_logp,
               vespo_log_offset, cfg: TermsConfig):
    """Same contract as terms.grpo_terms, vectorized over tokens."""
    N, S = logp.shape[0], advantages.shape[0]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_of_tok = torch.repeat_interleave(torch.arange(S, device=logp.device), lengths, output_size=N)
    n = lengths.clamp(min=1).float()
    w_seq = cfg.inv_norm / n if cfg.per_seq_mean else torch.full_like(n, cfg.inv_norm)
    adv = advantages[seq_of_tok]

    def per_seq_sum(x):
        return torch.zeros(S, device=logp.device).index_add_(0, seq_of_tok, x)

    if old_logp is None:
        log_ratio = torch.zeros_like(logp)  # old = logp.detach(): ratio 1
    elif cfg.seq_level:
        log_ratio = (per_seq_sum(logp - old_logp) / n)[seq_of_tok]
    else:
        log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)

    # The per-token weight of the policy term: the caller's, times the off-policy mask.
    weight = torch.ones_like(logp) if policy_weight is None else policy_weight
    if cfg.off_policy_threshold is not None:
        sampling = sampling_logp if sampling_logp is not None else old_logp if old_logp is not None else logp
        drift = torch.nan_to_num(sampling - logp, nan=0.0)  # unscored tokens give no evidence
        keep = (advantages >= 0) | (per_seq_sum(drift) / n <= cfg.off_policy_threshold)
        weight = weight * keep.float()[seq_of_tok]

    # policy term per token and its derivative with respect to the ratio, times the ratio
    # (d ratio / d logp = ratio per token; at sequence level see the Triton kernel's docstring).
    low = high = torch.zeros_like(logp, dtype=torch.bool)
    if cfg.policy == "clip":
        coef_2 = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
        d_coef_2 = ((ratio >= 1 - cfg.eps_low) & (ratio <= 1 + cfg.eps_high)).float()
        if cfg.delta is not None:
            coef_1, d_coef_1 = ratio.clamp(max=cfg.delta), (ratio <= cfg.delta).float()
        else:
            coef_1, d_coef_1 = ratio, torch.ones_like(ratio)
        u1, u2 = coef_1 * adv, coef_2 * adv
        # torch.minimum's gradient: to the smaller argument, split evenly on a tie.
        d_pick = torch.where(u1 < u2, d_coef_1, torch.where(u2 < u1, d_coef_2, 0.5 * (d_coef_1 + d_coef_2)))
        policy, d_policy = -torch.minimum(u1, u2), -adv * d_pick * ratio
        low, high = (coef_1 < 1 - cfg.eps_low) & (adv < 0), (coef_1 > 1 + cfg.eps_high) & (adv > 0)
    elif cfg.policy == "cispo":
        capped = ratio.clamp(max=cfg.eps_high)  # no gradient through the ratio
        policy, d_policy = -capped * adv * logp, -capped * adv
        high = (ratio > cfg.eps_high) & (adv > 0)
    elif cfg.policy == "vespo":
        phi = _vespo_weights(logp, old_logp, advantages, vespo_log_offset, per_seq_sum, cfg)[seq_of_tok]
        policy, d_policy = -phi * adv * logp, -phi * adv
    else:  # sapo
        tau = torch.where(adv > 0, cfg.sapo_tau_pos, cfg.sapo_tau_neg)
        sig = torch.sigmoid(tau * (ratio - 1))
        policy, d_policy = -sig * (4 / tau) * adv, -adv * 4 * sig * (1 - sig) * ratio
    tok_loss = weight * policy
    if cfg.seq_level and cfg.policy in ("clip", "sapo"):
        # The ratio is the sequence's: every token's gradient is the sequence mean of the weights.
        dlogp = d_policy * (per_seq_sum(weight) / n)[seq_of_tok]
    else:
        dlogp = weight * d_policy

    kl = logp.new_empty(0)
    if ref_logp is not None:
        diff = ref_logp - logp
        kl = torch.exp(diff) - diff - 1
        d_kl = 1 - torch.exp(diff)
        if cfg.bias_correction_kl:  # kl * ratio: the product rule, ratio's gradient as above
            d_ratio_kl = kl * ratio if not cfg.seq_level else (per_seq_sum(kl) / n)[seq_of_tok] * ratio
            kl, d_kl = kl * ratio, d_kl * ratio + d_ratio_kl
        if cfg.beta != 0.0:
            tok_loss = tok_loss + cfg.beta * kl
            dlogp = dlogp + cfg.beta * d_kl

    seq_loss = per_seq_sum(tok_loss) * w_seq
    return dlogp * w_seq[seq_of_tok], kl, seq_loss, per_seq_sum(low.float()), per_seq_sum(high.float())


def _vespo_weights(logp, old_logp, advantages, log_offset, per_seq_sum, cfg: TermsConfig):
    """(S,) vespo's phi per sequence (see options.POLICIES), without gradient."""
    log_w = torch.zeros_like(advantages)
    if old_logp is not None:
        log_w = per_seq_sum((logp - old_logp).clamp(-20.0, 20.0))
    if log_offset is not None:
        log_w = log_w + log_offset
    log_w = log_w.clamp(VESPO_LOG_W_MIN, 20.0)
    positive = advantages >= 0
    k = torch.where(positive, cfg.vespo_k_pos, cfg.vespo_k_neg)
    lam = torch.where(positive, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
