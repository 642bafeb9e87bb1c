"""Eager PyTorch path of the loss from hidden states: the same contract as _triton_hidden,
chunked over tokens and vocabulary so that it never holds N x V logits (the fp32 working
set is TOKEN_CHUNK x VOCAB_CHUNK, 32 MB with the defaults)."""
import torch

TOKEN_CHUNK, VOCAB_CHUNK = 1024, 8192


def _logits(h, weight, bias, v0, v1, temperature):
    """fp32 (n, v1 - v0) logits / T of fp32 hidden rows h against vocabulary rows v0:v1."""
    z = h @ weight[v0:v1].float().t()
    if bias is not None:
        z += bias[v0:v1].float()
    return z.div_(temperature)


def logprob_fwd(hidden, weight, bias, target_ids, temperature: float, with_entropy: bool):
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
            z = _logits(h, weight, bias, v0, v1, temperature)
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
            d = torch.exp(_logits(h, weight, bias, v0, v1, temperature) - lse[n0:n1, None]).neg_()
            inside = (target >= v0) & (target < v1)
            d.scatter_add_(1, (target - v0).clamp(0, v1 - v0 - 1)[:, None], inside.float()[:, None])
            d.mul_(coef[:, None])  # the per-token factor before any reduction over tokens
            dhidden[n0:n1] += d @ weight[v0:v1].float()
            dweight[v0:v1] += d.t() @ h
            if dbias is not None:
                dbias[v0:v1] += d.sum(0)
    return dhidden, dweight, dbias
