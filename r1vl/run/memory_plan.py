"""The memory plan: what a run will hold per GPU, derived from the model's config before any
weight is loaded, and checked against the device at start-up.

    python train.py --plan --model configs/qwen2_vl_7b.json --deepspeed configs/zero3.json --plan_gpus 4

Every figure comes from the config's shapes (hidden size, layers, heads, vocabulary, the
vision tower's width and depth), the dtype, the engine and the trainer's options; nothing is
looked up by model name. Two phases decide the peak:

  rollout  weights (all of them gathered under ZeRO-3), optimizer state, the KL reference, the
           rollout's KV cache (r1vl.sampling.kv_cache) and the decode step's fused projection weights
  update   the same persistent state, gradients, the activations of one packed micro-batch
           (with or without activation checkpointing), the fused loss's backward buffers

Activation figures are bytes saved for backward, op by op, as transformers' Qwen2-VL layers
save them (tests/r1vl/run/test_memory_plan.py counts them with saved_tensors_hooks on CPU and
holds the plan to 10%). One decoder layer, bf16, saves 2*(4H + 4 + 2eH) for its two RMSNorms
and the projections' inputs, e*(2*Hq*D + 2*Hkv*D + Hq*D) for attention (q, k, v, the output
and o_proj's input), 4*Hq for the log-sum-exp, 2eD for the per-layer M-RoPE tables, and 4eI
for the SwiGLU MLP: 104.6 KiB per token at the 2B shape. A checkpointed layer keeps only its
input (eH) and recomputes the rest in backward, one layer at a time.

What is not modelled: the CUDA context and allocator fragmentation (the plan fits when its
peak is at most FIT_FRACTION of the device), communication buffers other than ZeRO's
buckets, and the transient gradients inside one layer's backward beyond one layer's worth.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

GiB = 1 << 30
FIT_FRACTION = 0.92  # of the device's memory: the rest is the CUDA context and fragmentation

# The fused loss's working set (r1vl_kernels): the Triton backward materializes one logits
# chunk of CHUNK_BYTES; the eager CPU path one TOKEN_CHUNK x VOCAB_CHUNK fp32 block.
TRITON_CHUNK_BYTES = 1 << 29
TORCH_CHUNK_BYTES = 1024 * 8192 * 4


# -------------------------------------------------------------------------------- the model's shape


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL config that memory depends on."""

    family: str  # "qwen2_vl", "qwen2_5_vl" or "qwen3_vl"
    hidden: int  # H, language model width
    intermediate: int  # I, its MLP width
    layers: int  # L
    heads: int  # Hq
    kv_heads: int  # Hkv
    head_dim: int  # D
    vocab: int  # V
    tied: bool  # lm_head shares the input embedding
    v_dim: int  # C, the vision tower's width
    v_depth: int  # its blocks
    v_mlp: int  # its MLP width
    v_heads: int
    v_gated: bool  # SwiGLU MLP and RMSNorm (Qwen2.5-VL) vs fc1-QuickGELU-fc2 and LayerNorm (Qwen2-VL)
    v_out: int  # the merger's output width (= H)
    merge: int  # spatial merge size: merge**2 patches per image token
    patch_pixels: int  # in_channels * temporal_patch * patch**2 values per patch
    patch: int  # patch side in pixels
    temporal_patch: int
    # Qwen3-VL: unbiased q/k/v with RMSNorms of each query and key head; a biased patch
    # embedding, learned position embeddings and DeepStack mergers in the vision tower.
    qkv_bias: bool = True
    qk_norm: bool = False
    v_patch_bias: bool = False
    v_positions: int = 0  # learned position embeddings (rows of width C)
    deepstack: int = 0  # DeepStack mergers (each feeds one decoder layer)

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a transformers Qwen2VLConfig / Qwen2_5_VLConfig / Qwen3VLConfig."""
        text, vision = config.get_text_config(), config.vision_config
        family = config.model_type
        if family not in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
            raise ValueError(f"memory plan: model_type {family!r} is not qwen2_vl, qwen2_5_vl or qwen3_vl")
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        gated, qwen3 = family == "qwen2_5_vl", family == "qwen3_vl"
        v_dim = vision.embed_dim if family == "qwen2_vl" else vision.hidden_size
        v_mlp = int(vision.embed_dim * vision.mlp_ratio) if family == "qwen2_vl" else vision.intermediate_size
        v_out = vision.hidden_size if family == "qwen2_vl" else vision.out_hidden_size
        tied = bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))
        qwen3_fields = dict(qkv_bias=False, qk_norm=True, v_patch_bias=True,
                            v_positions=vision.num_position_embeddings,
                            deepstack=len(vision.deepstack_visual_indexes)) if qwen3 else {}
        return cls(family, text.hidden_size, text.intermediate_size, text.num_hidden_layers,
                   text.num_attention_heads, text.num_key_value_heads, head_dim, text.vocab_size, tied,
                   v_dim, vision.depth, v_mlp, vision.num_heads, gated, v_out, vision.spatial_merge_size,
                   vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2,
                   vision.patch_size, vision.temporal_patch_size, **qwen3_fields)

    # ---- parameters

    @property
    def layer_params(self) -> int:
        H, D = self.hidden, self.head_dim
        q, kv = self.heads * D, self.kv_heads * D
        attention = H * q + 2 * H * kv + q * H  # q, k, v, o
        attention += (q + 2 * kv) * self.qkv_bias + 2 * D * self.qk_norm  # q/k/v biases; q_norm, k_norm
        return attention + 3 * H * self.intermediate + 2 * H  # SwiGLU MLP, two RMSNorms

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def language_params(self) -> int:
        head = 0 if self.tied else self.vocab * self.hidden
        return self.embedding_params + self.layers * self.layer_params + self.hidden + head

    @property
    def vision_block_params(self) -> int:
        C, M = self.v_dim, self.v_mlp
        attention = 3 * C * C + 3 * C + C * C + C
        if self.v_gated:
            return attention + 2 * (C * M + M) + M * C + C + 2 * C  # gate/up/down with bias, RMSNorms
        return attention + C * M + M + M * C + C + 4 * C  # fc1, fc2, LayerNorms (weight + bias)

    @property
    def vision_params(self) -> int:
        C, wide = self.v_dim, self.v_dim * self.merge ** 2
        mlp = wide * wide + wide + wide * self.v_out + self.v_out
        merger = (C if self.v_gated else 2 * C) + mlp
        deepstack = self.deepstack * (2 * wide + mlp)  # LayerNorm over the merged width, then the MLP
        patch_embed = self.patch_pixels * C + C * self.v_patch_bias
        return patch_embed + self.v_positions * C + self.v_depth * self.vision_block_params + merger + deepstack

    @property
    def params(self) -> int:
        return self.language_params + self.vision_params

    @property
    def fused_decode_params(self) -> int:
        """What r1vl.sampling.decode.fuse_layers concatenates per rollout: q/k/v (weights and biases) and
        gate/up of every layer."""
        qkv = (self.heads + 2 * self.kv_heads) * self.head_dim
        return self.layers * (self.hidden * qkv + qkv * self.qkv_bias + 2 * self.intermediate * self.hidden)

    def lora_params(self, lora: LoraSpec) -> int:
        """Adapter parameters, r * (in + out) per adapted linear (r1vl.model.lora.target_names)."""
        H, I, D, r = self.hidden, self.intermediate, self.head_dim, lora.rank  # noqa: E741 (I: the MLP width, as in the papers)
        q, kv = self.heads * D, self.kv_heads * D
        shapes = {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
                  "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}
        n = self.layers * sum(r * sum(shapes[t]) for t in lora.targets if t in shapes)
        n += r * (self.hidden + self.vocab) * ("lm_head" in lora.targets)
        if lora.vision:
            C, M, wide = self.v_dim, self.v_mlp, self.v_dim * self.merge ** 2
            mlp = (3 if self.v_gated else 2) * r * (C + M)
            block = r * (C + 3 * C) + r * 2 * C + mlp  # qkv, proj, MLP
            merger = r * 2 * wide + r * (wide + self.v_out)
            n += self.v_depth * block + (1 + self.deepstack) * merger
        return n

    def lora_layer_activation_bytes(self, lora: LoraSpec, e: int, tokens: float) -> float:
        """What one decoder layer's adapters add to its saved tensors: each adapter's A output
        (r per token), which B saves; A's input is the projection's own, saved already (no
        dropout)."""
        return tokens * sum(t in lora.targets for t in DEFAULT_LORA_TARGETS) * lora.rank * e

    def adapted_params(self, lora: LoraSpec) -> int:
        """Weights of the adapted decoder projections (and lm_head): what the rollout merges."""
        H, I, D = self.hidden, self.intermediate, self.head_dim  # noqa: E741 (I: the MLP width)
        q, kv = self.heads * D, self.kv_heads * D
        sizes = {"q_proj": H * q, "k_proj": H * kv, "v_proj": H * kv, "o_proj": q * H,
                 "gate_proj": H * I, "up_proj": H * I, "down_proj": I * H}
        return self.layers * sum(sizes.get(t, 0) for t in lora.targets) + H * self.vocab * ("lm_head" in lora.targets)

    @property
    def largest_layer_params(self) -> int:
        return max(self.layer_params, self.vision_block_params, self.embedding_params)

    def image_tokens(self, max_pixels: int) -> int:
        """Image tokens of the largest image the processor gives (max_pixels)."""
        side = self.patch * self.merge
        return max(1, max_pixels // (side * side))

    # ---- activations: bytes saved for backward

    def layer_activation_bytes(self, e: int, tokens: float, keys: float | None = None, frozen: bool = False) -> float:
        """One decoder layer over `tokens` packed rows, attending over `keys` key rows (the
        shared-prompt layout gathers each prompt's keys once per completion; default tokens).
        e: bytes per element of the model's dtype. frozen: the layer's own weights take no
        gradient (LoRA): its RMSNorms' normalized input, needed only for their weights'
        gradients, is not saved."""
        H, D, Hq, Hkv = self.hidden, self.head_dim, self.heads, self.kv_heads
        keys = tokens if keys is None else keys
        norms = 2 * (4 * H + 4 + (1 if frozen else 2) * e * H)  # fp32 input, rsqrt, normalized, next projection's input
        attention = e * (3 * Hq * D) + 4 * Hq  # q, output, o_proj input; the log-sum-exp
        if self.qk_norm:  # q_norm, k_norm: fp32 input, rsqrt, normalized heads (RoPE's input)
            attention += (4 + e) * (Hq + Hkv) * D + 4 * (Hq + Hkv)
        return tokens * (norms + attention + 4 * e * self.intermediate) + keys * (2 * e * Hkv * D)

    def vision_block_activation_bytes(self, e: int, patches: float) -> float:
        """One vision block over `patches` patches."""
        C, M = self.v_dim, self.v_mlp
        if self.v_gated:
            norms = 2 * (4 * C + 4 + 2 * e * C)
            mlp = 4 * e * M
        else:
            norms = 2 * (2 * e * C + 8)  # LayerNorm input, mean/rstd, next projection's input
            # fc1 output, sigmoid, fc2 input (Qwen2-VL's QuickGELU); Qwen3-VL's tanh GELU
            # saves no sigmoid
            mlp = (2 if self.family == "qwen3_vl" else 3) * e * M
        # q and k after RoPE, the qkv buffer (v is a view of it), output and proj input; lse;
        # RoPE tables in fp32 (fresh per block unless the model is fp32).
        attention = e * 7 * C + 4 * self.v_heads + (0 if e == 4 else 8 * (C // self.v_heads))
        return patches * (norms + attention + mlp)

    def vision_activation_bytes(self, e: int, patches: float, checkpointing: bool, recompute: bool = True) -> float:
        """The whole tower over `patches` patches (patch embedding, blocks, merger); recompute
        as for language_activation_bytes."""
        C = self.v_dim
        # The patch embedding's input (in fp32 the batch's own pixel_values: nothing new) and,
        # in fp32, the RoPE tables every block shares.
        shared = patches * (e * self.patch_pixels if e != 4 else 8 * (C // self.v_heads))
        if self.v_gated:
            merger = patches * (4 * C + 4 + 2 * e * C + e * C)
        else:
            merger = patches * (e * C + 8 + 3 * e * C)  # ln_q input + stats, fc1 input, GELU input, fc2 input
        # Qwen3-VL: each DeepStack merger normalizes the merged width (input, stats), then fc1
        # input, GELU input, fc2 input; the position embeddings' bilinear interpolation keeps
        # 4 int64 indices and 4 fp32 weights per patch (48 bytes).
        merger += self.deepstack * patches * (4 * e * C + 8 / self.merge ** 2)
        shared += patches * 48 * (self.v_positions > 0)
        if checkpointing:  # each block keeps its input; one block recomputed at a time
            blocks = self.v_depth * e * C * patches \
                + (self.vision_block_activation_bytes(e, patches) if recompute else 0)
        else:
            blocks = self.v_depth * self.vision_block_activation_bytes(e, patches)
        return shared + blocks + merger

    def language_activation_bytes(self, e: int, tokens: float, keys: float, targets: float,
                                  checkpointing: bool, recompute: bool = True, frozen: bool = False) -> float:
        """The language model's forward over a packed row (embedding to the completion rows'
        final hidden states, which the fused loss saves). recompute: with checkpointing,
        include the one layer recomputed at a time in backward (the peak), else only what
        the forward leaves saved."""
        H = self.hidden
        # The image mask, the M-RoPE cos/sin every layer shares, the final norm; the loss's inputs.
        around = tokens * (1 + 2 * e * self.head_dim + 4 * H + 4 + e * H * (not frozen)) + targets * (8 + e * H + 16)
        if checkpointing:  # layer inputs, one layer recomputed at a time
            layers = self.layers * e * H * tokens + (
                self.layer_activation_bytes(e, tokens, keys, frozen) if recompute else 0)
        else:
            layers = self.layers * self.layer_activation_bytes(e, tokens, keys, frozen)
        return around + layers

    def kv_cache_bytes(self, e: int, prompts: int, prompt_slots: int, completions: int, columns: int) -> int:
        """r1vl.sampling.kv_cache.RolloutCache: keys and values of every layer, prompts held once."""
        per_token = 2 * self.layers * self.kv_heads * self.head_dim * e
        return per_token * (prompts * prompt_slots + completions * columns)


def load_model_config(source: str):
    """A transformers config from a checkpoint directory (its config.json) or a config JSON
    file (configs/qwen2_vl_2b.json): nothing else is read, no weights."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    path = Path(source)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"--model {source}: no config.json (a checkpoint directory or a config JSON file)")
    values = json.loads(path.read_text(encoding="utf-8"))
    classes = {"qwen2_vl": Qwen2VLConfig, "qwen2_5_vl": Qwen2_5_VLConfig}
    if values.get("model_type") not in classes:
        raise ValueError(f"--model {source}: model_type {values.get('model_type')!r} is not one of {sorted(classes)}")
    return classes[values["model_type"]](**{k: v for k, v in values.items() if k != "model_type"})


# -------------------------------------------------------------------------------- the engine


@dataclass(frozen=True)
class EngineSpec:
    """How the weights, gradients and optimizer state are held (r1vl.update.engine / deepspeed_engine)."""

    zero_stage: int = 0  # 0 = PlainEngine (every rank holds everything, fp32 masters of bf16 weights)
    offload_optimizer: bool = False  # fp32 master weights, AdamW moments and fp32 gradients on the CPU
    offload_param: bool = False  # ZeRO-3: the weights' shards on the CPU
    reduce_bucket: int = 0  # elements of ZeRO's gradient reduction buckets
    prefetch_bucket: int = 0  # ZeRO-3: elements gathered ahead of the layer that needs them
    config_file: str = ""  # where it came from, for the plan's text

    @classmethod
    def from_deepspeed_json(cls, raw: dict | None, path: str = "") -> EngineSpec:
        if raw is None:
            return cls()
        zero = raw.get("zero_optimization", {})
        on_cpu = lambda key: (zero.get(key) or {}).get("device", "none") == "cpu"  # noqa: E731
        return cls(int(zero.get("stage", 0)), on_cpu("offload_optimizer"), on_cpu("offload_param"),
                   int(zero.get("reduce_bucket_size", 5e8)), int(zero.get("stage3_prefetch_bucket_size", 5e7)),
                   path)

    @property
    def name(self) -> str:
        if self.zero_stage == 0:
            return "plain"
        offload = "+".join(k for k, on in (("optimizer", self.offload_optimizer), ("param", self.offload_param)) if on)
        return f"zero{self.zero_stage}" + (f" offload {offload}" if offload else "")


# -------------------------------------------------------------------------------- LoRA


DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSpec:
    """--lora_rank and what it adapts (r1vl.model.lora); rank 0 = no LoRA."""

    rank: int = 0
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    vision: bool = False

    @classmethod
    def from_config(cls, cfg) -> LoraSpec:
        return cls(cfg.lora_rank, tuple(t.strip() for t in cfg.lora_target_modules.split(",")), cfg.lora_vision)


# -------------------------------------------------------------------------------- the plan


@dataclass
class Item:
    name: str
    bytes: float
    note: str = ""


@dataclass
class MemoryPlan:
    """Per-GPU bytes of each item, the two phases and the peak, against the device."""

    shape: ModelShape
    engine: EngineSpec
    world_size: int
    checkpointing: bool
    micro_batch_tokens: int  # the packed rows of one micro-batch this plan assumes
    device_bytes: float | None  # None: a CPU run (no device limit)
    persistent: list[Item] = field(default_factory=list)
    rollout: list[Item] = field(default_factory=list)
    update: list[Item] = field(default_factory=list)
    per_token: dict = field(default_factory=dict)  # activation bytes per token per layer, with/without checkpointing
    notes: list[str] = field(default_factory=list)

    @property
    def rollout_peak(self) -> float:
        return sum(i.bytes for i in self.persistent + self.rollout)

    @property
    def update_peak(self) -> float:
        return sum(i.bytes for i in self.persistent + self.update)

    @property
    def peak(self) -> float:
        return max(self.rollout_peak, self.update_peak)

    @property
    def fits(self) -> bool:
        return self.device_bytes is None or self.peak <= FIT_FRACTION * self.device_bytes

    def item(self, name: str) -> float:
        return sum(i.bytes for i in self.persistent + self.rollout + self.update if i.name == name)

    def format(self) -> str:
        gb = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
        lines = [f"memory plan, per GPU: {self.shape.family} ({self.shape.params / 1e9:.2f} B parameters), "
                 f"{self.engine.name} on {self.world_size} GPU(s), activation checkpointing "
                 f"{'on' if self.checkpointing else 'off'}, {self.micro_batch_tokens} tokens per micro-batch"]
        for title, items in (("held throughout", self.persistent), ("rollout", self.rollout),
                             ("update", self.update)):
            lines.append(f"  {title}:")
            lines += [f"    {i.name:<28}{gb(i.bytes)}  {i.note}" for i in items]
        lines.append(f"  activations per token per decoder layer: {self.per_token['layer'] / 1024:.1f} KiB without "
                     f"checkpointing, {self.per_token['layer_checkpointed'] / 1024:.1f} KiB with")
        lines.append(f"  peak: rollout {self.rollout_peak / GiB:.2f} GiB, update {self.update_peak / GiB:.2f} GiB")
        if self.device_bytes is None:
            lines.append(f"  device: CPU run, no device memory to check against (peak {self.peak / GiB:.2f} GiB of host memory)")
        else:
            lines.append(f"  device: {self.device_bytes / GiB:.1f} GiB; the plan fits under {FIT_FRACTION:.0%} of it: "
                         f"{'yes' if self.fits else 'NO'} ({self.peak / self.device_bytes:.0%})")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def plan_memory(shape: ModelShape, *, dtype_bytes: int, engine: EngineSpec, world_size: int, checkpointing: bool,
                micro_batch_tokens: int, batch_size: int, num_generations: int, max_prompt_length: int,
                max_completion_length: int, max_pixels: int, beta: float, share_prompts: bool = True,
                freeze_vision_tower: bool = False, num_iterations: int = 1, on_cuda: bool = True,
                device_bytes: float | None = None, max_images: int = 1, lora: LoraSpec = LoraSpec()) -> MemoryPlan:
    """The plan for one rank. The micro-batch holds full-length groups (max_prompt_length
    prompts with max_images images of max_pixels each, 0 = as many as max_prompt_length
    holds; max_completion_length completions), at most the
    rank's whole batch; on CUDA the rollout compiles its decode step, which keeps its KV cache
    and fused weights between rollouts (r1vl.sampling.generate's workspaces)."""
    e, N, s = dtype_bytes, world_size, shape
    Phi = s.params
    Psi = Phi - (s.vision_params if freeze_vision_tower else 0)
    if lora.rank:
        # LoRA (r1vl.model.lora): the base frozen, the adapters (in the weights' dtype) are what
        # trains, so masters, moments and gradients are the adapters'; the vision tower is
        # frozen unless adapted; the KL reference is the adapters switched off, no copy.
        Psi = s.lora_params(lora)
        freeze_vision_tower = not lora.vision
    z = engine.zero_stage
    plan = MemoryPlan(shape, engine, N, checkpointing, 0, device_bytes)

    # ---- held throughout
    if z == 3:
        where = "on the CPU (offload_param)" if engine.offload_param else f"a 1/{N} shard"
        plan.persistent.append(Item("weights", 0 if engine.offload_param else Phi * e / N, where))
    else:
        plan.persistent.append(Item("weights", Phi * e, "whole on every rank" + (", frozen" if lora.rank else "")))
    if lora.rank:
        plan.persistent.append(Item("LoRA adapters", Psi * e / (N if z == 3 else 1),
                                    f"rank {lora.rank}, {Psi / 1e6:.1f} M parameters"))
    if z == 0:  # r1vl.update.engine: fp32 masters of weights that are not fp32, AdamW on them
        plan.persistent.append(Item("optimizer state", 8 * Psi, "fp32 AdamW moments"))
        plan.persistent.append(Item("master weights", 4 * Psi, "fp32 copy of the trainable weights") if e < 4 else
                               Item("master weights", 0, "none: AdamW steps the fp32 weights in place"))
    elif engine.offload_optimizer:
        plan.persistent.append(Item("optimizer state", 0, "fp32 AdamW moments on the CPU (offload_optimizer)"))
        plan.persistent.append(Item("master weights", 0, "fp32, on the CPU (offload_optimizer)"))
    else:
        plan.persistent.append(Item("optimizer state", 8 * Psi / N, f"fp32 AdamW moments, a 1/{N} shard"))
        plan.persistent.append(Item("master weights", 4 * Psi / N, f"fp32, a 1/{N} shard"))
    if beta == 0:
        plan.persistent.append(Item("reference model", 0, "none (beta = 0)"))
    elif lora.rank:
        plan.persistent.append(Item("reference model", 0, "none: the policy with its adapters off"))
    elif z == 3:
        plan.persistent.append(Item("reference model", 0 if engine.offload_param else Phi * e / N,
                                    "on the CPU (offload_param)" if engine.offload_param else f"frozen, a 1/{N} shard"))
    else:
        plan.persistent.append(Item("reference model", Phi * e, "frozen copy, whole"))

    # ---- the rollout: all of a rank's prompts at once, G completions each
    prompts = max(1, batch_size // num_generations)
    slots = -(-max_prompt_length // 64) * 64 if on_cuda else max_prompt_length
    kv = s.kv_cache_bytes(e, prompts, slots, batch_size, max_completion_length)
    fused = s.fused_decode_params * e
    kept = "kept between rollouts (CUDA graphs)" if on_cuda else "during the rollout"
    (plan.persistent if on_cuda else plan.rollout).append(
        Item("rollout KV cache", kv, f"{prompts} prompts x {slots} + {batch_size} completions x "
                                     f"{max_completion_length} tokens, {kept}"))
    (plan.persistent if on_cuda else plan.rollout).append(Item("decode fused weights", fused, f"q/k/v and gate/up, {kept}"))
    if lora.rank:  # r1vl.model.lora.merged_adapters: a merged copy of every adapted weight per rollout
        plan.rollout.append(Item("merged adapted weights", s.adapted_params(lora) * e,
                                 "base + adapters, for the rollout"))
        if on_cuda:  # the graphs also keep the merged o_proj / down_proj they read
            D, H = s.head_dim, s.hidden
            kept_o_down = s.layers * (("o_proj" in lora.targets) * s.heads * D * H
                                      + ("down_proj" in lora.targets) * s.intermediate * H)
            plan.persistent.append(Item("decode o/down copies", kept_o_down * e, "merged, kept between rollouts"))
    if z == 3:
        plan.rollout.append(Item("gathered weights", Phi * e, "ZeRO-3 gathers every weight for the rollout"))
    prefill_tokens = prompts * max_prompt_length
    plan.rollout.append(Item("prefill and sampling", prefill_tokens * e * (2 * s.intermediate + 4 * s.hidden)
                             + 3 * batch_size * s.vocab * 4, "one layer's working set, (B, V) fp32 logits"))

    # ---- the update: one packed micro-batch
    img = s.image_tokens(max_pixels)
    img *= max_images if max_images > 0 else max(1, max_prompt_length // img)  # a prompt's image tokens
    if share_prompts:
        group = max_prompt_length + num_generations * max_completion_length
    else:
        group = num_generations * (max_prompt_length + max_completion_length)
    rank_tokens = prompts * group
    T = min(micro_batch_tokens, rank_tokens)
    plan.micro_batch_tokens = T
    groups = T / group
    keys = T + (groups * num_generations * max_prompt_length if share_prompts else 0)
    patches = max(1.0, groups) * img * s.merge ** 2
    targets = groups * num_generations * max_completion_length
    lm = s.language_activation_bytes(e, T, keys, targets, checkpointing, frozen=bool(lora.rank))
    if lora.rank:  # with checkpointing: the one layer recomputed at a time
        lm += s.lora_layer_activation_bytes(lora, e, T) * (1 if checkpointing else s.layers) \
            + targets * lora.rank * e * ("lm_head" in lora.targets)
    vision = s.vision_activation_bytes(e, patches, checkpointing) if not freeze_vision_tower else patches * e * s.v_out
    if z:
        plan.update.append(Item("gradients", Psi * e / N + 2 * engine.reduce_bucket * e,
                                f"a 1/{N} shard + reduction buckets"))
    else:  # fp32 whatever the weights' dtype: bf16 gradients are accumulated on the masters
        plan.update.append(Item("gradients", 4 * Psi, "whole, fp32" + (" (on the master weights)" if e < 4 else "")))
    plan.update.append(Item("activations, language model", lm,
                            f"{T} tokens ({keys:.0f} key rows), checkpointed" if checkpointing else f"{T} tokens"))
    plan.update.append(Item("activations, vision tower", vision,
                            "frozen: its output only" if freeze_vision_tower else
                            f"{patches:.0f} patches{', checkpointed' if checkpointing else ''}"))
    chunk = TRITON_CHUNK_BYTES if on_cuda else TORCH_CHUNK_BYTES
    plan.update.append(Item("fused loss backward", chunk + 4 * s.vocab * s.hidden + 4 * targets * s.hidden,
                            "one logits chunk, fp32 dweight (V, H) and dhidden (N, H)"))
    plan.update.append(Item("backward transient", s.layer_activation_bytes(e, T, keys),
                            "one layer's activation gradients (estimated)"))
    if z == 3:
        live = (s.largest_layer_params + engine.prefetch_bucket + s.embedding_params) * e
        plan.update.append(Item("ZeRO-3 live weights", live, "the largest module, the prefetch bucket, lm_head"))
    if z and not engine.offload_optimizer:
        plan.update.append(Item("fp32 gradient shard", 4 * Psi / N, "at the optimizer step"))

    plan.per_token = {"layer": s.layer_activation_bytes(e, 1), "layer_checkpointed": e * s.hidden}
    # Not counted yet (issue 38): the optimizer step's temporaries off CUDA (torch's CPU AdamW
    # takes exp_avg_sq.sqrt() of one parameter at a time: the largest one's fp32 size; CUDA
    # runs the fused step, none), the bf16 copy of dweight in the backward from hidden states,
    # K/V repeated to every query head on torch < 2.13's varlen_attn, and the fused decode
    # weights built anew at each rollout before they are copied into the kept ones.
    plan.notes.append("not counted: the CPU optimizer step's per-parameter sqrt temporary, the bf16 dweight copy "
                      "of the hidden-state backward, K/V repeated per query head on torch < 2.13's varlen_attn, "
                      "the fused decode weights' rebuild at each rollout")
    if num_iterations > 1:
        plan.notes.append("num_iterations > 1: the old log-probs' forward runs without gradient (no extra peak)")
    if T < micro_batch_tokens:
        plan.notes.append(f"a rank's whole batch at full lengths is {rank_tokens} tokens: micro-batches hold at "
                          f"most that, not --micro_batch_tokens {micro_batch_tokens}")
    return plan





OFFLOAD_CONFIG, ZERO3_CONFIG = "configs/zero3_offload.json", "configs/zero3.json"
