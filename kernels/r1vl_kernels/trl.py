"""TRL's GRPOTrainer with the loss computed by r1vl_kernels from the final hidden states.

    from trl import GRPOTrainer                          # before
    from r1vl_kernels.trl import FusedGRPOTrainer        # after: same arguments, same training

FusedGRPOTrainer overrides one method, GRPOTrainer._compute_loss: the model's backbone gives
the final hidden states of the completion positions, and grpo_loss_from_hidden computes the
loss with the lm_head matmul fused in (Triton on GPU, chunked eager PyTorch on CPU), so that
no logits tile is ever written to memory, forward or backward. Everything else (generation,
rewards, advantages, old and reference log-probs, logging, the optimizer) is TRL's own.

Written against trl 1.16 (imported only when this module is; `import r1vl_kernels` needs
neither trl nor transformers). The loss is TRL's, term by term: the tests compare loss and
every parameter's gradient with GRPOTrainer._compute_loss on the same weights and batch.
Covered: loss_type grpo, bnpo, dr_grpo, dapo, luspo, cispo, sapo, vespo; token- and sequence-level
importance sampling; epsilon / epsilon_high / delta; beta with use_bias_correction_kl; vLLM's
importance-sampling correction (token or sequence modes); top_entropy_quantile;
off_policy_mask_threshold; temperature; cast_lm_head_to_fp32; tool masks; text models and
Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dense; tied or untied lm_head); PEFT models (peft_config,
as TRL's: adapters on any layer but lm_head, which TRL itself refuses). Refused at
construction, by name: the entropy bonus (entropy_coef, use_adaptive_entropy: it needs the
entropy's gradient), MoE router auxiliary losses, ZeRO-3 and FSDP (the lm_head weight is
sharded), and models whose logits are soft-capped or scaled or whose inputs are another VLM's.

top_entropy_quantile < 1 costs one more forward pass over hidden x lm_head (without
gradient) to know the entropies before the loss, as TRL needs them for its quantile.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from trl import GRPOTrainer
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import nanmax, nanmin

from .hidden import grpo_loss_from_hidden, token_logprobs_from_hidden

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
# The backbone (model.base_model) of each takes the inputs below and does everything else
# itself: the M-RoPE positions, the image features, Qwen3-VL's DeepStack features.
VISION_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# Model inputs the backbone gets besides input_ids and attention_mask (text and Qwen-VL).
VISION_INPUTS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")
# Batch keys of other VLM families in TRL: their pixel layouts are not handled here.
OTHER_VISION_INPUTS = ("pixel_attention_mask", "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                       "image_position_ids")
# Text-config attributes that change the logits beyond hidden @ weight^T + bias.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")


class FusedGRPOTrainer(GRPOTrainer):
    """trl.GRPOTrainer whose loss never builds logits (see the module docstring)."""

    # The kernels' implementation: None picks Triton for CUDA tensors and eager PyTorch on CPU
    # (Triton there too under TRITON_INTERPRET=1), as r1vl_kernels' functions do.
    kernel_impl: str | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        unsupported_options(self)

    def _compute_loss(self, model, inputs):
        """GRPOTrainer._compute_loss (trl 1.16), same value, gradient and logged metrics."""
        unwrapped = self.accelerator.unwrap_model(model)
        if unwrapped is model:
            return self._fused_loss(unwrapped, inputs)
        # Through the wrapper's forward (DDP, DeepSpeed), so that its hooks see the backbone run.
        return _ForwardRedirection()(model, unwrapped, self._fused_loss, unwrapped, inputs)

    # ------------------------------------------------------------------------- the loss

    def _fused_loss(self, model, inputs: dict[str, Any]) -> torch.Tensor:
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        T = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        advantages = inputs["advantages"]
        if advantages.dim() != 1:
            raise ValueError("FusedGRPOTrainer needs one advantage per sequence: inputs['advantages'] of shape (B,)")
        for key in OTHER_VISION_INPUTS:
            if inputs.get(key) is not None:
                raise ValueError(f"FusedGRPOTrainer handles text and Qwen2-VL inputs only, got {key!r}")

        hidden, dtype = self._completion_hidden_states(model, inputs, T)
        lm_head = model.get_output_embeddings()  # never adapted: TRL refuses a PEFT adapter on lm_head
        weight, bias = lm_head.weight, lm_head.bias
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)

        policy_weight = None
        if self.top_entropy_quantile < 1.0:
            with torch.no_grad():
                _, entropies = token_logprobs_from_hidden(hidden.detach(), weight.detach(), completion_ids,
                                                          bias=None if bias is None else bias.detach(),
                                                          temperature=self.temperature, return_entropy=True,
                                                          impl=self.kernel_impl)
            policy_weight = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile).float()
        vespo_log_offset = None
        if self.loss_type == "vespo":
            # vespo reads the vLLM ratios (whenever the batch has them, as TRL does) inside its
            # weight phi, as a per-sequence offset of the summed log-ratio; they are no factor.
            ratio = inputs.get("importance_sampling_ratio")
            if ratio is not None:
                vespo_log_offset = torch.log(ratio.float()).clamp(math.log(1e-8), 20.0).sum(-1)
        elif self.use_vllm and self.vllm_importance_sampling_correction:
            ratio = inputs["importance_sampling_ratio"].float().expand(mask.shape)  # (B, T) or (B, 1)
            policy_weight = ratio if policy_weight is None else policy_weight * ratio

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss_type, num_items = self.loss_type, None
        if loss_type in ("dapo", "cispo", "vespo"):
            # num_items_in_batch spans the generation batch: TRL rescales it to one accumulation window.
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            num_items = float(num_items)

        out = grpo_loss_from_hidden(
            hidden, weight, completion_ids, advantages=advantages,
            old_logp=inputs.get("old_per_token_logps"),
            ref_logp=inputs["ref_per_token_logps"] if self.beta != 0.0 else None,
            bias=bias, completion_mask=mask, temperature=self.temperature, beta=self.beta,
            epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, delta=self.args.delta,
            loss_type=loss_type, importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length, num_items_in_batch=num_items,
            policy_weight=policy_weight, off_policy_threshold=self.off_policy_mask_threshold,
            sampling_logp=(inputs.get("sampling_per_token_logps") if self.off_policy_mask_threshold is not None
                           else None),
            bias_correction_kl=self.args.use_bias_correction_kl,
            sapo_temperature_pos=self.args.sapo_temperature_pos,
            sapo_temperature_neg=self.args.sapo_temperature_neg, vespo_k_pos=self.args.vespo_k_pos,
            vespo_lambda_pos=self.args.vespo_lambda_pos, vespo_k_neg=self.args.vespo_k_neg,
            vespo_lambda_neg=self.args.vespo_lambda_neg, vespo_log_offset=vespo_log_offset, return_entropy=True,
            impl=self.kernel_impl)
        loss = out.loss if loss_type in ("dapo", "cispo", "vespo") else out.loss / accumulation
        self._log_loss_metrics(mode, out, inputs, mask, advantages)
        return loss

    def _completion_hidden_states(self, model, inputs, T: int) -> tuple[torch.Tensor, torch.dtype]:
        """(B, T, H): the final hidden state at each position that predicts a completion token
        (TRL scores token j from position j - 1), and the dtype TRL's fused head computes in."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        for key in VISION_INPUTS:
            if inputs.get(key) is not None:
                model_inputs[key] = inputs[key]
        with self.accelerator.autocast():
            hidden = _unwrap_peft(model).base_model(**model_inputs).last_hidden_state
            device = hidden.device.type
            if self.args.cast_lm_head_to_fp32:
                dtype = torch.float32  # TRL runs the head in fp32, outside autocast
            elif torch.is_autocast_enabled(device):
                dtype = torch.get_autocast_dtype(device)
            else:
                dtype = hidden.dtype
        return hidden[:, -T - 1:-1], dtype

    # ------------------------------------------------------------------------- metrics

    def _log_loss_metrics(self, mode, out, inputs, mask, advantages) -> None:
        """The metrics GRPOTrainer._compute_loss logs, from the kernel's detached outputs."""
        mask = mask.float()
        adv = advantages.unsqueeze(1)

        def global_masked_mean(x):
            if x.shape[1] == 1:  # one value per sequence
                local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
            else:
                local = torch.stack([(x * mask).sum(), mask.sum()])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def masked_seq_mean(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(global_masked_mean(out.kl))
        self._metrics[mode]["entropy"].append(global_masked_mean(out.entropy))

        old = inputs.get("old_per_token_logps")
        log_ratio = torch.zeros_like(out.logp) if old is None else out.logp - old
        if self.loss_type == "vespo":
            phi = self.get_gamma_weights(
                advantages=adv, log_ratio_per_token=log_ratio, mask=mask,
                importance_sampling_ratio=inputs.get("importance_sampling_ratio"),
                k_pos=self.args.vespo_k_pos, lambda_pos=self.args.vespo_lambda_pos,
                k_neg=self.args.vespo_k_neg, lambda_neg=self.args.vespo_lambda_neg)
            self._metrics[mode]["vespo/phi_seq_mean"].append(global_masked_mean(phi))
            return
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        coef_1 = torch.exp(log_ratio)
        if self.loss_type == "cispo":
            clipped = ((coef_1 > self.epsilon_high) & (adv > 0)).float()
            self._metrics[mode]["cispo_clip_ratio"].append(global_masked_mean(clipped))
        elif self.loss_type != "sapo":
            if self.args.delta is not None:
                coef_1 = torch.clamp(coef_1, max=self.args.delta)
            low = ((coef_1 < 1 - self.epsilon_low) & (adv < 0)).float()
            high = ((coef_1 > 1 + self.epsilon_high) & (adv > 0)).float()
            self._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(low))
            self._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(high))
            self._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
            self._metrics[mode]["clip_ratio/low_min"].append(
                nanmin(self.accelerator.gather(masked_seq_mean(low))).item())
            self._metrics[mode]["clip_ratio/high_max"].append(
                nanmax(self.accelerator.gather(masked_seq_mean(high))).item())


# ----------------------------------------------------------------------------- refusals


def unsupported_options(trainer: GRPOTrainer) -> None:
    """Raise ValueError naming the first option of this trainer the fused loss cannot give
    exactly (never a silently different loss)."""
    args, model = trainer.args, trainer.model
    if trainer.loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(f"FusedGRPOTrainer does not support loss_type={trainer.loss_type!r} "
                         f"(supported: {', '.join(SUPPORTED_LOSS_TYPES)})")
    if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
        raise ValueError("FusedGRPOTrainer does not support the entropy bonus (entropy_coef, use_adaptive_entropy): "
                         "the fused loss gives no gradient through the entropy")
    if trainer.aux_loss_enabled:
        raise ValueError("FusedGRPOTrainer does not support the MoE router auxiliary loss (router_aux_loss_coef != 0)")
    if trainer.is_fsdp_enabled:
        raise ValueError("FusedGRPOTrainer does not support FSDP (fsdp): the lm_head weight is sharded")
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3:
        raise ValueError("FusedGRPOTrainer does not support DeepSpeed ZeRO-3 (zero_optimization.stage=3): "
                         "the lm_head weight is sharded")
    config = model.config
    text_config = config.get_text_config()
    for name in LOGIT_TRANSFORMS:
        if getattr(text_config, name, None) not in (None, 1.0):
            raise ValueError(f"FusedGRPOTrainer does not support models whose logits are transformed "
                             f"({type(text_config).__name__}.{name}={getattr(text_config, name)!r})")
    if text_config is not config and config.model_type not in VISION_MODEL_TYPES:
        raise ValueError(f"FusedGRPOTrainer supports text models and {', '.join(VISION_MODEL_TYPES)}, "
                         f"got model_type={config.model_type!r}")
    if model.get_output_embeddings() is None or not hasattr(model, "base_model"):
        raise ValueError(f"FusedGRPOTrainer needs a causal LM with an lm_head, got {type(model).__name__}")


def _unwrap_peft(model):
    """The transformers model under a PEFT model (its adapters injected in place), else `model`:
    its .base_model is then the backbone, as for a plain model."""
    return model.get_base_model() if _is_peft(model) else model


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
