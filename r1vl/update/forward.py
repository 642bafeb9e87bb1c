"""One forward of a packed batch through a Qwen-VL model, down to the completion rows only; the
switch to plain sdpa attention for what cannot run packed."""
from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from r1vl.model.attention import is_varlen_implementation
from r1vl.update.packing import PackedBatch


def completion_hidden(model: torch.nn.Module, packed: PackedBatch) -> torch.Tensor:
    """Final hidden states (after the last norm) at the rows that predict completion tokens.

    One forward of the packed row. The vision tower runs once, on the distinct images only
    (G completions of one prompt share its image); in the shared-prompt layout the prompt's
    text and image tokens run through the language model once per group too. The lm_head is
    not applied at all, so the caller projects just these N rows (a fused loss takes them
    with the lm_head weight). Rows that predict several targets (a shared prompt's last row
    predicts each sibling's first token) are repeated, so their gradient is the sum.

    Args:
        model: Qwen2-VL, Qwen2.5-VL or Qwen3-VL, ForConditionalGeneration or the base model. With
            r1vl.model.attention's implementation the boundaries below are used directly; with
            "sdpa"/"eager" transformers rebuilds a block-diagonal mask from the restarting
            positions, which only the unshared layout has (a shared-prompt batch needs
            r1vl.model.attention.use_varlen_attention, and says so).
        packed: from r1vl.update.packing.pack, on the model's device, either layout.

    Returns:
        (N, H) in the model's dtype; row n predicts packed.target_ids[n], and the rows of
        sequence s are completion_cu_seqlens[s] : completion_cu_seqlens[s + 1].

    Use with the fused loss, the lm_head applied inside the kernel (r1vl.update.losses does this):
        hidden = completion_hidden(policy, packed)
        out = grpo_loss_from_hidden(hidden, policy.lm_head.weight, packed.target_ids,
                                    packed.completion_cu_seqlens, advantages, old_logp, ref_logp, ...)
    """
    base = model.model if hasattr(model, "lm_head") else model  # skip the head: never all T rows
    shared = {}
    if packed.shares_prompts:
        text_attention = getattr(base.config.get_text_config(), "_attn_implementation", None)
        if not is_varlen_implementation(text_attention):
            raise ValueError(
                f"completion_hidden: a shared-prompt batch needs r1vl's varlen attention "
                f"(r1vl.model.attention.use_varlen_attention), the model uses {text_attention!r}"
            )
        shared = {"r1vl_key_index": packed.key_index}
    mm_encoder_outputs = None
    if packed.pixel_values is not None:
        # Run the tower here rather than inside base(...): only here can it see the distinct
        # images alone, and the text boundaries passed below must not reach the tower, whose
        # own attention takes per-image cu_seqlens.
        vision = base.get_image_features(packed.pixel_values, packed.image_grid_thw)
        mm_encoder_outputs = {"image": image_token_features(vision, packed.image_token_source)}

    out = base(
        input_ids=packed.input_ids,
        position_ids=packed.position_ids,
        mm_token_type_ids=packed.mm_token_type_ids,
        mm_encoder_outputs=mm_encoder_outputs,
        attention_mask=None,
        use_cache=False,
        # Reach every language-model attention call as keyword arguments.
        cu_seq_lens_q=packed.cu_seqlens,
        cu_seq_lens_k=packed.cu_seqlens_k if packed.shares_prompts else packed.cu_seqlens,
        max_length_q=packed.max_seqlen,
        max_length_k=packed.max_seqlen_k if packed.shares_prompts else packed.max_seqlen,
        **shared,
    )
    return out.last_hidden_state[0].index_select(0, packed.completion_index)


def image_token_features(vision, token_source: torch.Tensor) -> BaseModelOutputWithPooling:
    """The vision tower's output on the distinct images, laid out for the packed row's image
    tokens: row i is the features of image-token row token_source[i].

    vision: what `get_image_features` returns, pooler_output a tuple of (n_j, H) per image;
    Qwen3-VL's also has deepstack_features, one such tuple per DeepStack layer (the features
    its decoder adds to the first layers' hidden states at the image tokens), which follow
    the same rows. Returned in the form the model's forward takes as mm_encoder_outputs.
    """
    def for_tokens(per_image) -> tuple[torch.Tensor]:
        return (torch.cat(per_image).index_select(0, token_source),)

    deepstack = getattr(vision, "deepstack_features", None)
    if deepstack is None:
        return BaseModelOutputWithPooling(pooler_output=for_tokens(vision.pooler_output))
    return type(vision)(pooler_output=for_tokens(vision.pooler_output),
                        deepstack_features=[for_tokens(layer) for layer in deepstack])



