"""Qwen2-VL's language model run for sampling: a packed prefill and a one-token decode step.

Both run the model's own modules (embedding, projections, MLPs, rotary embedding, lm_head)
in the model's order, its RMSNorms as torch's fused rms_norm and, in the decode step, its
q/k/v and gate/up projections each as one matmul, residual adds inside the matmuls
(`fuse_layers`); the attention and the cache are this project's:
  - `prefill`: every prompt of the rollout in one packed forward (attention within each
    prompt: r1vl.model.attention's varlen kernels on a GPU, sdpa on the padded cache layout on a
    CPU), the images through the vision tower in one
    call (each image once), the keys and values written into the RolloutCache, the logits of
    each prompt's last token returned;
  - `decode_step`: one token for each live row, its keys and values written in place at
    column t, attention by `shared_prefix_attention`. Shapes depend only on the batch size
    and the number of columns read, so torch.compile can capture it (and CUDA graphs replay it).

Works for Qwen2-VL and Qwen2.5-VL (the same decoder) and Qwen3-VL (unbiased q/k/v projections
followed by RMSNorms of each head, q_norm and k_norm; interleaved M-RoPE, which the model's own
rotary embedding computes; DeepStack features added to the first layers' outputs at the image
tokens in the prefill). Refused for sliding-window layers.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from r1vl.data.prompts import Prompt
from r1vl.model.attention import pick_backend, varlen_attention
from r1vl.model.lora import is_lora_layer, linear_weight
from r1vl.sampling.kv_cache import RolloutCache, shared_prefix_attention


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack of a Qwen-VL ForConditionalGeneration (r1vl.model.families), checked."""
    lm = model.model.language_model
    types = getattr(lm.config, "layer_types", None) or []
    if any(t != "full_attention" for t in types):
        raise ValueError(f"generate: only full-attention layers are supported, the model has {sorted(set(types))}")
    return lm


def rope_tables(lm, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own rotary embedding at (3, 1, N) M-RoPE positions: cos (N, 1, D) and sin with
    its first half negated, so that rotate_half(x) * sin = roll(x, D/2) * signed sin."""
    cos, sin = lm.rotary_emb(hidden, positions)  # (1, N, D) each
    half = sin.shape[-1] // 2
    return cos[0, :, None], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)[:, None]


def text_rope_tables(lm, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_tables for (N,) positions equal on all three M-RoPE axes (sampled tokens): the
    sections' recomposition is then the identity, and default RoPE is cos/sin of position x
    inverse frequency, computed here in four ops instead of the module's dozen."""
    rotary = lm.rotary_emb
    if getattr(rotary, "rope_type", None) != "default" or getattr(rotary, "attention_scaling", None) != 1.0:
        return rope_tables(lm, hidden, positions.view(1, 1, -1).expand(3, 1, -1))
    freqs = positions[:, None].float() * rotary.inv_freq.to(hidden.device, torch.float)  # (N, D/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), -1)[:, None].to(hidden.dtype), torch.cat((-sin, sin), -1)[:, None].to(hidden.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x (N, H, D): the model's rotate-half RoPE, x * cos + rotate_half(x) * sin, in three ops."""
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, dims=-1), signed_sin)


class FusedLayer(NamedTuple):
    """One decoder layer's weights joined for the decode step (fewer, larger ops)."""

    qkv_weight: torch.Tensor  # (Hq*D + 2*Hkv*D, hidden): q, k and v projections as one matmul
    qkv_bias: torch.Tensor | None  # (Hq*D + 2*Hkv*D,); None for Qwen3-VL (unbiased projections)
    o_weight: torch.Tensor  # (hidden, Hq*D): o_proj, applied with the residual add (addmm)
    gate_up_weight: torch.Tensor  # (2*I, hidden): gate and up projections as one matmul
    down_weight: torch.Tensor  # (hidden, I): down_proj, applied with the residual add


@torch.no_grad()
def fuse_layers(model: torch.nn.Module) -> list[FusedLayer] | None:
    """Every layer's FusedLayer, built from the current weights (once per rollout), or None
    unless every layer is a stock one: plain nn.Linear projections (q/k/v all biased, or all
    unbiased with q_norm / k_norm as in Qwen3-VL; unbiased o/gate/up/down) and a SiLU MLP.
    A peft LoRA layer counts as its base nn.Linear: its weight is merged with the current
    adapters here (r1vl.model.lora.linear_weight), a new tensor, so the decode step reads the
    adapted policy without the adapters' two extra matmuls per projection. Anything else runs
    through its modules."""
    fused = []
    for layer in language_model(model).layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        rest = [attn.o_proj, getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None),
                getattr(mlp, "down_proj", None)]
        plain = [m.get_base_layer() if is_lora_layer(m) else m for m in qkv + rest]
        biased = [m.bias is not None for m in plain[:3] if type(m) is torch.nn.Linear]
        if (any(type(m) is not torch.nn.Linear for m in plain) or len(set(biased)) != 1
                or any(m.bias is not None for m in plain[3:])
                or type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLU", "SiLUActivation")):
            return None
        (q, q_bias), (k, k_bias), (v, v_bias), (o, _), (gate, _), (up, _), (down, _) = map(linear_weight, qkv + rest)
        fused.append(FusedLayer(torch.cat([q, k, v]), torch.cat([q_bias, k_bias, v_bias]) if biased[0] else None,
                                o, torch.cat([gate, up]), down))
    return fused


# weight * x / rms(x), fp32 statistics
_RMS_NORMS = ("Qwen2VLRMSNorm", "Qwen2_5_VLRMSNorm", "Qwen2RMSNorm", "Qwen3VLTextRMSNorm")


def fused_norm(module, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm as PyTorch's fused rms_norm (one op instead of seven; the same
    arithmetic: fp32 statistics, the weight applied in the input's dtype)."""
    eps, weight = getattr(module, "variance_epsilon", None), getattr(module, "weight", None)
    if eps is None or weight is None or type(module).__name__ not in _RMS_NORMS:
        return module(x)
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, eps=eps).to(x.dtype)


def _qkv(attn, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: FusedLayer | None = None):
    """(N, hidden) -> q (N, Hq, D), k, v (N, Hkv, D): projected, each head of q and k through
    the layer's q_norm / k_norm where it has them (Qwen3-VL), then RoPE applied to q and k."""
    N, D = hidden.shape[0], attn.head_dim
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if fused is None:
        q = attn.q_proj(hidden).view(N, -1, D)
        k = attn.k_proj(hidden).view(N, -1, D)
        v = attn.v_proj(hidden).view(N, -1, D)
    else:
        Hkv = attn.k_proj.out_features // D
        qkv = F.linear(hidden, fused.qkv_weight, fused.qkv_bias).view(N, -1, D)  # heads: Hq query, Hkv key, Hkv value
        if q_norm is None:
            qk = _rope(qkv[:, :-Hkv], cos, sin)  # q and k rotate alike: one op for both
            return qk[:, :-Hkv], qk[:, -Hkv:], qkv[:, -Hkv:]
        q, k, v = qkv[:, :-2 * Hkv], qkv[:, -2 * Hkv:-Hkv], qkv[:, -Hkv:]
    if q_norm is not None:
        q, k = fused_norm(q_norm, q), fused_norm(k_norm, k)
    return _rope(q, cos, sin), _rope(k, cos, sin), v


def _mlp_block(layer, hidden: torch.Tensor, fused: FusedLayer | None = None) -> torch.Tensor:
    hidden_in = fused_norm(layer.post_attention_layernorm, hidden)
    if fused is None:
        return hidden + layer.mlp(hidden_in)
    gate_up = F.linear(hidden_in, fused.gate_up_weight)
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.addmm(hidden, F.silu(gate) * up, fused.down_weight.t())


# --------------------------------------------------------------------------------------------
# Prefill
# --------------------------------------------------------------------------------------------


def prompt_positions(model: torch.nn.Module, prompt: Prompt) -> tuple[torch.Tensor, int]:
    """The model's own M-RoPE index of one prompt: (3, P) int64 and the rope delta (the
    position of the first sampled token is P + delta on all three axes)."""
    device = model.lm_head.weight.device
    ids = prompt.ids[None].to(device)
    types = (ids == model.config.image_token_id).to(torch.int32)
    positions, delta = model.model.get_rope_index(ids, mm_token_type_ids=types,
                                                  image_grid_thw=prompt.image_grid_thw.to(device))
    return positions[:, 0], int(delta.reshape(-1)[0])


def prefill(model: torch.nn.Module, prompts: list[Prompt], cache: RolloutCache,
            positions: list[torch.Tensor], backend: str | None = None, first_slot: int = 0) -> torch.Tensor:
    """Run prompts through the model in one packed forward and fill cache's prefix part.

    Args:
        prompts: P prompts with one image each.
        cache: allocated for the rollout; prompt p goes to prefix slot first_slot + p.
        positions: each prompt's (3, P_i) M-RoPE positions (`prompt_positions`).
        backend: r1vl.model.attention backend; None picks the fastest for the device and dtype.

    Returns:
        (P, V) fp32 logits of each prompt's next token.
    """
    base, lm = model.model, language_model(model)
    device = model.lm_head.weight.device
    lengths = [p.ids.numel() for p in prompts]
    ids = torch.cat([p.ids for p in prompts]).to(device)  # (T,)
    hidden = lm.embed_tokens(ids)  # (T, hidden)
    # The vision tower sees every image once, in one call (it attends within each image).
    pixels = torch.cat([p.pixel_values for p in prompts]).to(device, base.visual.dtype)
    grids = torch.cat([p.image_grid_thw for p in prompts]).to(device)
    vision = base.get_image_features(pixels, grids)
    features = torch.cat(vision.pooler_output).to(hidden.dtype)
    is_image = ids == model.config.image_token_id
    if int(is_image.sum()) != features.shape[0]:
        raise ValueError(f"generate: the prompts hold {int(is_image.sum())} image tokens for "
                         f"{features.shape[0]} image features")
    hidden = hidden.masked_scatter(is_image[:, None], features)
    # Qwen3-VL: DeepStack features of intermediate vision layers, added to the output of decoder
    # layer i at the image tokens, as the model's _deepstack_process does (in the hidden dtype).
    deepstack = [torch.cat(layer).to(hidden.dtype) for layer in getattr(vision, "deepstack_features", None) or []]
    image_rows = is_image.nonzero()[:, 0] if deepstack else None  # one host sync, not one per layer

    T = ids.numel()
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    pos = torch.cat(positions, dim=1).to(device)  # (3, T)
    cos, sin = rope_tables(lm, hidden, pos[:, None])
    # Packed token i is token j of prompt p: where its keys go in the padded prefix cache.
    prompt_of = torch.repeat_interleave(torch.arange(first_slot, first_slot + len(prompts), device=device),
                                        torch.tensor(lengths, device=device), output_size=T)
    index_in_prompt = torch.arange(T, device=device) - cu[:-1].to(torch.int64)[prompt_of - first_slot]
    if backend is None:
        backend = pick_backend(device, hidden.dtype)
    slots, Lp = slice(first_slot, first_slot + len(prompts)), max(lengths)
    for i, layer in enumerate(lm.layers):
        attn = layer.self_attn
        q, k, v = _qkv(attn, fused_norm(layer.input_layernorm, hidden), cos, sin)
        # (NP, Hkv, Lp, D) seen as (NP, Lp, Hkv, D): one scatter writes every prompt's rows.
        cache.prefix_k[i].transpose(1, 2)[prompt_of, index_in_prompt] = k
        cache.prefix_v[i].transpose(1, 2)[prompt_of, index_in_prompt] = v
        if backend == "sdpa":
            # Without a varlen kernel, attend on the cache's padded layout: padding sits after
            # each prompt, so the causal mask alone keeps real rows off it (cheaper than the
            # (T, T) block-diagonal mask of the packed sdpa fallback).
            padded = q.new_zeros(cache.prefix_k.shape[1], Lp, q.shape[1], q.shape[2])
            padded[prompt_of, index_in_prompt] = q
            out = F.scaled_dot_product_attention(
                padded[slots].transpose(1, 2), cache.prefix_k[i, slots, :, :Lp], cache.prefix_v[i, slots, :, :Lp],
                is_causal=True, scale=attn.scaling, enable_gqa=True)
            out = out.transpose(1, 2)[prompt_of - first_slot, index_in_prompt]  # (T, Hq, D)
        else:
            out = varlen_attention(q, k, v, cu, max(lengths), causal=True, scale=attn.scaling, backend=backend)
        hidden = hidden + attn.o_proj(out.reshape(T, -1))
        hidden = _mlp_block(layer, hidden)
        if i < len(deepstack):  # hidden[rows] + features, rounded once, as the model's own addition
            hidden = hidden.index_put((image_rows,), deepstack[i], accumulate=True)
    last = fused_norm(lm.norm, hidden[cu[1:].to(torch.int64) - 1])  # (P, hidden): only the last token's logits
    return model.lm_head(last).float()


# --------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------


def decode_step(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    column: torch.Tensor | int,
    slots: torch.Tensor,
    group: int,
    prompts: int | None,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_bias: torch.Tensor,
    comp_k: torch.Tensor,
    comp_v: torch.Tensor,
    columns: int,
    masked: bool,
    fused: list | None = None,
) -> torch.Tensor:
    """Feed one token per live row; return the next token's logits.

    Args:
        tokens: (B,) int64, the token each row sampled last (completion column `column`).
        positions: (B,) int64, its M-RoPE position (the same on all three axes).
        column: the cache column the new keys go to: an int, or a () int64 tensor (compiled).
        slots, group: each row's place in the prefix grid (see shared_prefix_attention).
        prompts: NP, the prompt slots in use: slots 0..NP-1 of the prefix part; None: all of them
            (compiled: no static shape from the prompt count).
        prefix_k, prefix_v: (L, >=NP, Hkv, Lp, D) model dtype; prefix_bias (>=NP, Lp) fp32.
        comp_k, comp_v: (L, >=B, Hkv, C, D) model dtype: rows 0..B-1 are the live rows; written
            in place.
        columns: how many completion columns to attend over, <= C (a Python int: a static shape).
        masked: mask the columns past `column` (when `columns` is a bucket, not column + 1).
        fused: `fuse_layers(model)`, or None to call the modules.

    Returns:
        (B, V) fp32 logits.

    The cache comes whole and is sliced here: compiled, its tensors are then the graph's inputs
    themselves, whose static addresses CUDA graphs read in place (a slice made by the caller is
    a new tensor at every call, which a replay would first copy into the graph's buffer).
    """
    lm = model.model.language_model
    B = tokens.shape[0]
    hidden = lm.embed_tokens(tokens)  # (B, hidden)
    # Sampled tokens sit at the same position on all three M-RoPE axes.
    cos, sin = text_rope_tables(lm, hidden, positions)
    comp_bias = None
    if masked:
        comp_bias = torch.zeros(columns, device=tokens.device).masked_fill_(
            torch.arange(columns, device=tokens.device) > column, float("-inf"))
    write_index = None  # compiled: (rows, heads, column) of the cache's new column
    for i, layer in enumerate(lm.layers):
        attn = layer.self_attn
        layer_fused = None if fused is None else fused[i]
        q, k, v = _qkv(attn, fused_norm(layer.input_layernorm, hidden), cos, sin, layer_fused)
        keys, values = comp_k[i, :B], comp_v[i, :B]  # (B, Hkv, C, D) views of the cache
        if isinstance(column, int):  # eager: a plain strided copy (index_copy_ is slower on a CPU)
            keys[:, :, column] = k
            values[:, :, column] = v
        else:  # a tensor: the same code serves every position in a captured graph
            # On the cache itself with a full index, not on the view: compiled, an in-place write
            # to a view becomes an out-of-place copy of the whole cache scattered back (inductor
            # cannot reinplace a slice/select_scatter), where index_put_ on the input stays one
            # column's write (tests/r1vl/sampling/test_decode_graph.py).
            if write_index is None:
                Hkv = k.shape[1]
                write_index = (torch.arange(B, device=tokens.device)[:, None],
                               torch.arange(Hkv, device=tokens.device)[None, :], column)
            at = (torch.full((1, 1), i, dtype=torch.int64, device=tokens.device), *write_index)
            comp_k.index_put_(at, k)
            comp_v.index_put_(at, v)
        Hkv = k.shape[1]
        query = q.view(B, Hkv, -1, attn.head_dim)  # heads h*R..h*R+R-1 share kv head h
        out = shared_prefix_attention(query, prefix_k[i, :prompts], prefix_v[i, :prompts], prefix_bias[:prompts],
                                      slots, group, keys[:, :, :columns], values[:, :, :columns], comp_bias,
                                      scale=attn.scaling)
        if layer_fused is None:
            hidden = hidden + attn.o_proj(out.reshape(B, -1))
        else:
            hidden = torch.addmm(hidden, out.reshape(B, -1), layer_fused.o_weight.t())
        hidden = _mlp_block(layer, hidden, layer_fused)
    return model.lm_head(fused_norm(lm.norm, hidden)).float()
