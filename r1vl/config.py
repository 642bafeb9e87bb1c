"""The trainer's options: plain dataclasses, one per stage, under one `Config`; a flat CLI
generated from their fields, an optional flat file.

    python train.py --lr 2e-6 --num_generations 8
    python train.py --config run.yaml --beta 0        # the command line wins over the file

Each stage's options live in its own dataclass (`cfg.sampling.temperature`,
`cfg.optimizer.lr`), and each stage is built from its own: the Sampler from SamplingOptions,
the Scorer from RewardOptions, the engines from OptimizerOptions. Option names are unique
across stages, so the command line, a --config file and RUN_DIR/config.json stay one flat
mapping of names to values; adding an option is adding one field to one stage's dataclass.

Defaults are the paper's (R1-VL, StepGRPO on Qwen2-VL-2B). With `--model tiny` (the
default) the built-in CPU demonstration runs, and the options in TINY_DEFAULTS take the
values that make it finish in minutes on two cores, unless given on the command line or in
the file. Every contradiction is refused at start-up by `Config.validate`.

This module imports no other part of r1vl: the choices it checks are plain data here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

STAGES = ("grpo", "sft", "sft+grpo")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTENTIONS = ("auto", "flash_attn", "varlen_attn", "sdpa", "sdpa_masked")
CHECKPOINTING = ("auto", "on", "off")
# The paper's reward, StepRAR + StepRVR (r1vl.rewards.functions: the built-ins and the user's).
DEFAULT_REWARD_FUNCS = ("steprar", "steprvr")
# The built-in tiny model's families: r1vl.model.families.FAMILIES's keys (a test keeps them equal).
FAMILY_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def option(default, help: str, bare=None, spellings: dict | None = None):
    """A stage field with its --help text. bare: the value of the option given without one
    (booleans: True); spellings: other values accepted for it, and what each means."""
    return dataclasses.field(default=default, metadata={"help": help, "bare": bare, "spellings": spellings or {}})


@dataclass
class DataOptions:
    """What the run trains on, how its records and pictures are read (r1vl.data.table, the prompt
    encoder; docs/data.md)."""

    data: str = option(
        "", 'RL data: JSON/JSONL, Parquet, a datasets save_to_disk dir or a dir of shards (docs/data.md); '
            '"" with model=tiny writes the synthetic task')
    sft_data: str = option("", "SFT data, chat form (r1vl.data.records.load_sft); \"\" = the RL data's solutions")
    image_root: str = option("", "directory image paths are relative to; \"\" = the data file's directory")
    prompt_key: str = option("", 'column of the prompt; "" = recognised ("prompt", "problem", "question")')
    image_key: str = option("", 'column of the image(s); "" = recognised ("images", "image", "image_path")')
    solution_key: str = option("", 'column of the reference solution; "" = "solution" if there is one')
    answer_key: str = option("", 'column of the final answer; "" = "answer" if there is one')
    max_images: int = option(1, "images per prompt at most (a record with more is refused); 0 = no cap")
    check_images: str = option("all", '"all": open every image at start-up; "lazy": check files exist, '
                                      'decode images when used')
    skip_bad_records: bool = option(False, "leave bad --data records out (counted and listed) instead of stopping")
    max_pixels: int = option(400000, "images are resized to at most this many pixels")
    min_pixels: int = option(3136, "... and at least this many (56 x 56)")


@dataclass
class ModelOptions:
    """Which model is trained and how it is loaded (r1vl.model.policy.load_trainable)."""

    model: str = option(
        "tiny", '"tiny" (built-in tiny model from a config, --family) or a local Qwen2-VL / Qwen2.5-VL / '
                'Qwen3-VL HF directory')
    family: str = option(
        "", 'the built-in tiny model\'s family with --model tiny: qwen2_vl (""), qwen2_5_vl or qwen3_vl; '
            'a checkpoint\'s family is its config.json\'s model_type')
    dtype: str = option("auto", "auto = bfloat16 on GPU, float32 on CPU")
    attention: str = option(
        "auto", "packed attention backend: auto / flash_attn / varlen_attn / sdpa / sdpa_masked (a CPU-only "
                "reference, one masked call, memory quadratic in the packed length: to see whether a result "
                "survives other rounding)")
    freeze_vision_tower: bool = option(
        False, "keep the vision tower (ViT blocks and patch merger) as loaded, in the warm-up and in StepGRPO")
    activation_checkpointing: str = option(
        "auto", "recompute each decoder layer and vision block in backward: on (also the bare flag) / off / "
                "auto (on when the memory plan without it does not fit the GPU; off on a CPU); true / false "
                "mean on / off", bare="on", spellings={True: "on", False: "off", "true": "on", "false": "off"})
    # LoRA (r1vl.model.lora, through peft): adapters instead of the full weights; the KL reference
    # is then the same model with the adapters switched off
    lora_rank: int = option(0, "LoRA rank r; 0 = off (every weight trains)")
    lora_alpha: float = option(0.0, "LoRA scale numerator (the update is alpha/r * B A); 0 = 2 x lora_rank")
    lora_dropout: float = option(0.0, "dropout on the adapters' inputs in training (must be 0 when lm_head is adapted)")
    lora_target_modules: str = option(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "comma-separated projections of the language model's decoder layers to adapt; lm_head may be added")
    lora_vision: bool = option(False, "also adapt every linear layer of the vision tower and its merger(s)")


@dataclass
class SamplingOptions:
    """The rollout: how many completions, how long, at what temperature (r1vl.sampling.Sampler)."""

    num_generations: int = option(4, "G, completions per prompt")
    batch_size: int = option(4, "completions (not prompts) per rank per GRPO step, a multiple of G")
    temperature: float = option(1.2, "sampling temperature, also the loss's logit temperature")
    top_p: float = option(1.0, "nucleus sampling; 1.0 = off")
    max_prompt_length: int = option(512, "tokens incl. image tokens; longer prompts are skipped, never cut")
    max_completion_length: int = option(1024, "tokens sampled per completion at most")
    ignore_eos: bool = option(
        False, "benchmarks: decode exactly max_completion_length tokens per completion (no stop at EOS)")

    @property
    def prompts_per_step(self) -> int:
        """Prompts each rank samples per GRPO step."""
        return self.batch_size // self.num_generations


@dataclass
class RewardOptions:
    """Scoring and advantages (r1vl.rewards.scorer.Scorer)."""

    reward_funcs: tuple[str, ...] = option(
        DEFAULT_REWARD_FUNCS, "what the advantages are computed from: steprar / steprvr / accuracy (built-ins), "
                              "path/to/file.py:function or package.module:function (TRL's reward signature)")
    reward_weights: tuple[float, ...] = option((), "one weight per --reward_funcs entry; none given = all 1")
    reward_timeout_s: float = option(
        300.0, "wall time one user reward function may take on one step's completions; past it the run stops")
    reward_alpha: float = option(0.1, "weight of the key-step match in StepRAR")
    reward_normalize: bool = option(False, "lenient answer / key-step matching (off = the paper's rule)")
    reward_symbolic: bool = option(True, "math-verify equivalence of answers")
    scale_rewards: str = option("group", "advantage scaling: group / batch / none")


@dataclass
class ObjectiveOptions:
    """The StepGRPO objective and its length (r1vl.update.grpo)."""

    num_steps: int = option(500, "GRPO steps (one rollout each)")
    num_iterations: int = option(1, "optimizer steps per rollout; > 1 computes old log-probs")
    beta: float = option(0.04, "KL coefficient (k3 estimator) to the frozen reference")
    epsilon_low: float = option(0.2, "clip range below 1")
    epsilon_high: float = option(0.2, "clip range above 1")
    loss_type: str = option("grpo", "grpo / bnpo / dr_grpo / dapo (TRL's reductions)")
    loss_softmax: str = option(
        "float32", "the loss's softmax: float32 (the fused kernels) or float64 (an eager float64 reference, "
                   "--loss_type grpo only, (N, V) logits held: to see whether a result survives other rounding)")


@dataclass
class OptimizerOptions:
    """The engine that applies the updates: AdamW, its schedule, clipping, DeepSpeed (r1vl.update.choose_engine)."""

    lr: float = option(1e-6, "AdamW learning rate of the GRPO stage")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay")
    adam_beta1: float = option(0.9, "AdamW first-moment decay")
    adam_beta2: float = option(0.999, "AdamW second-moment decay")
    lr_schedule: str = option("constant", "constant / linear / cosine decay after warm-up")
    warmup_steps: int = option(0, "optimizer steps of linear warm-up")
    max_grad_norm: float = option(1.0, "clip the global gradient norm; 0 = off")
    max_bad_steps: int = option(3, "stop after this many updates skipped for a non-finite loss or gradient")
    deepspeed: str = option(
        "", 'a DeepSpeed JSON config (configs/zero2.json, configs/zero3.json); "" = plain data parallelism')


@dataclass
class SFTOptions:
    """The supervised warm-up (stage sft / sft+grpo; r1vl.update.sft)."""

    sft_steps: int = option(200, "optimizer steps of the warm-up")
    sft_batch_size: int = option(8, "examples (one prompt + solution sequence each) per rank per warm-up step")
    sft_lr: float = option(2e-5, "the paper's warm-up rate for the 2B model")


@dataclass
class MemoryOptions:
    """Packing, hardware and the memory plan (r1vl.update.microbatches, r1vl.run.memory_check)."""

    micro_batch_tokens: int = option(16384, "token budget of one packed micro-batch (forward + backward)")
    share_prompts: bool = option(
        True, "pack each prompt once per group [prompt, c1..cG] in the update and log-prob forwards")
    device: str = option("auto", '"auto" (cuda if available), "cpu", "cuda"')
    kernel_impl: str = option("auto", "r1vl_kernels impl: auto = triton on CUDA, torch on CPU")
    plan: bool = option(False, "print the memory plan per GPU and exit; --model may be a config JSON file")
    plan_gpus: int = option(0, "GPUs the plan is for; 0 = this run's world size")
    gpu_memory_gb: float = option(
        0.0, "device memory (GiB) the plan is checked against; 0 = the GPU's own, none on a CPU run")


@dataclass
class RunOptions:
    """The run itself: its stages, directory, seed, checkpoints and console."""

    stage: str = option("grpo", '"grpo", "sft" (warm-up only) or "sft+grpo"')
    run_dir: str = option("", 'where metrics, the config and the final policy go; "" = runs/<time>')
    seed: int = option(0, "seeds data order, sampling and the tiny model")
    resume: str = option(
        "", '"auto" = the newest complete checkpoint in --run_dir (none: start afresh), or a checkpoint dir')
    save_every: int = option(100, "trainer checkpoint every K optimizer steps of each stage and at its end; 0 = none")
    keep_last: int = option(2, "trainer checkpoints kept in RUN_DIR/checkpoints (the newest)")
    save_final: bool = option(True, "save the final policy (safetensors) with its tokenizer and processor")
    log_every: int = option(1, "console line every N steps (the JSONL gets every step)")
    progress: bool = option(True, "progress bars on rank 0 (one plain line per step when not a terminal)")
    # watching a run: sample completions and experiment trackers (r1vl.run.samples, r1vl.run.trackers)
    log_completions_every: int = option(
        10, "every K StepGRPO steps, a few prompts with all G completions, their rewards and advantages "
            "to RUN_DIR/samples.jsonl and the trackers; 0 = none")
    log_completions_prompts: int = option(2, "prompts (each with its G completions) per --log_completions_every")
    report_to: str = option(
        "tensorboard", 'comma-separated trackers: none, tensorboard, wandb, mlflow, swanlab or all '
                       "(wandb, mlflow, swanlab: pip install '.[trackers]')")
    run_name: str = option("", "the run's name in the trackers; \"\" = the run directory's name")
    tracker_project: str = option("r1vl", "wandb / swanlab project, MLflow experiment")

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages to run, in order: ("sft",), ("grpo",) or ("sft", "grpo")."""
        return tuple(self.stage.split("+"))


@dataclass
class EvalOptions:
    """The held-out evaluation (r1vl.heldout)."""

    eval_prompts: int = option(0, "held-out prompts scored before and after training; 0 = none")
    eval_every: int = option(
        0, "also score them every K StepGRPO steps (a learning curve); 0 = before and after only")
    eval_generations: int = option(0, "completions per held-out prompt; 0 = num_generations")


@dataclass
class Config:
    """All the options, one dataclass per stage. Build one with make_config / parse_config
    (flat names, validated); `flat()` is the flat mapping back. The stages' names differ from
    every option's (no `cfg.model` or `cfg.data` that could be read as the old flat string)."""

    dataset: DataOptions = dataclasses.field(default_factory=DataOptions)
    policy: ModelOptions = dataclasses.field(default_factory=ModelOptions)
    sampling: SamplingOptions = dataclasses.field(default_factory=SamplingOptions)
    reward: RewardOptions = dataclasses.field(default_factory=RewardOptions)
    objective: ObjectiveOptions = dataclasses.field(default_factory=ObjectiveOptions)
    optimizer: OptimizerOptions = dataclasses.field(default_factory=OptimizerOptions)
    sft: SFTOptions = dataclasses.field(default_factory=SFTOptions)
    memory: MemoryOptions = dataclasses.field(default_factory=MemoryOptions)
    run: RunOptions = dataclasses.field(default_factory=RunOptions)
    evaluation: EvalOptions = dataclasses.field(default_factory=EvalOptions)

    @classmethod
    def from_flat(cls, values: dict) -> Config:
        """A Config from flat option values (the others at their dataclass defaults); not
        validated, no TINY_DEFAULTS: make_config does both."""
        unknown = sorted(set(values) - set(OPTION_STAGE))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}  # JSON lists
        return cls(**{stage: kind(**{k: v for k, v in values.items() if OPTION_STAGE[k] == stage})
                      for stage, kind in STAGE_CLASSES.items()})

    def flat(self) -> dict:
        """{option name: value} over every stage: the CLI's, a --config file's and
        RUN_DIR/config.json's form."""
        return {f.name: getattr(getattr(self, OPTION_STAGE[f.name]), f.name) for f in OPTION_FIELDS}

    def replace(self, **values) -> Config:
        """A copy with some options (flat names) changed; not validated."""
        return Config.from_flat({**self.flat(), **values})

    def validate(self) -> None:
        """Raise ValueError naming the option for anything unusable or contradictory. The
        checks that need the domain (the --deepspeed file, a checkpoint's files) are made at
        start-up by r1vl.run.setup.check_inputs and the memory plan."""
        o = SimpleNamespace(**self.flat())  # the checks span stages and name the flat options

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(o.stage in STAGES, f"--stage must be one of {STAGES}, got {o.stage!r}")
        need(o.loss_type in LOSS_TYPES, f"--loss_type must be one of {LOSS_TYPES}, got {o.loss_type!r}")
        need(o.scale_rewards in ("group", "batch", "none"),
             f"--scale_rewards must be group, batch or none, got {o.scale_rewards!r}")
        need(o.lr_schedule in SCHEDULES, f"--lr_schedule must be one of {SCHEDULES}, got {o.lr_schedule!r}")
        need(o.dtype in DTYPES, f"--dtype must be one of {DTYPES}, got {o.dtype!r}")
        need(o.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {o.device!r}")
        need(o.kernel_impl in ("auto", "torch", "triton"),
             f"--kernel_impl must be auto, torch or triton, got {o.kernel_impl!r}")
        need(o.attention in ATTENTIONS, f"--attention must be one of {ATTENTIONS}, got {o.attention!r}")
        need(o.reward_timeout_s > 0, f"--reward_timeout_s must be > 0, got {o.reward_timeout_s}")
        need(o.loss_softmax in ("float32", "float64"),
             f"--loss_softmax must be float32 or float64, got {o.loss_softmax!r}")
        need(not (o.loss_softmax == "float64" and o.loss_type != "grpo"),
             f"--loss_softmax float64 (the eager check) implements --loss_type grpo only, got {o.loss_type!r}")
        need(o.num_generations >= 2,
             f"--num_generations must be >= 2 (advantages are relative within a group), got {o.num_generations}")
        need(o.batch_size >= 1 and o.batch_size % o.num_generations == 0,
             f"--batch_size ({o.batch_size}) must be a positive multiple of --num_generations "
             f"({o.num_generations}): every prompt brings all G of its completions")
        need(o.beta >= 0, f"--beta must be >= 0, got {o.beta}")
        need(o.temperature > 0, f"--temperature must be > 0, got {o.temperature}")
        need(0 < o.top_p <= 1, f"--top_p must be in (0, 1], got {o.top_p}")
        need(o.epsilon_low >= 0 and o.epsilon_high >= 0, "--epsilon_low and --epsilon_high must be >= 0")
        for name in ("max_prompt_length", "max_completion_length", "num_iterations", "micro_batch_tokens",
                     "sft_batch_size", "log_every", "max_bad_steps"):
            need(getattr(o, name) >= 1, f"--{name} must be >= 1, got {getattr(o, name)}")
        need(o.check_images in ("all", "lazy"), f'--check_images must be "all" or "lazy", got {o.check_images!r}')
        need(o.max_images >= 0, f"--max_images must be >= 0 (0 = no cap), got {o.max_images}")
        need(o.keep_last >= 1, f"--keep_last must be >= 1, got {o.keep_last}")
        need(o.log_completions_every >= 0 and o.log_completions_prompts >= 1,
             "--log_completions_every must be >= 0 and --log_completions_prompts >= 1")
        need(not (o.resume == "auto" and not o.run_dir),
             "--resume auto looks for checkpoints in --run_dir; give the run directory of the run to continue")
        for name in ("num_steps", "sft_steps", "warmup_steps", "eval_prompts", "eval_every", "eval_generations",
                     "min_pixels", "save_every"):
            need(getattr(o, name) >= 0, f"--{name} must be >= 0, got {getattr(o, name)}")
        need(o.max_pixels >= o.min_pixels,
             f"--max_pixels ({o.max_pixels}) must be >= --min_pixels ({o.min_pixels})")
        need(o.micro_batch_tokens >= o.max_prompt_length + o.max_completion_length,
             f"--micro_batch_tokens ({o.micro_batch_tokens}) must hold one whole sequence: at least "
             f"--max_prompt_length + --max_completion_length = {o.max_prompt_length + o.max_completion_length}")
        need(o.lr > 0 and o.sft_lr > 0, "--lr and --sft_lr must be > 0")
        need(o.max_grad_norm >= 0, f"--max_grad_norm must be >= 0, got {o.max_grad_norm}")
        need(o.activation_checkpointing in CHECKPOINTING,
             f"--activation_checkpointing must be auto, on or off, got {o.activation_checkpointing!r}")
        need(o.plan_gpus >= 0 and o.gpu_memory_gb >= 0, "--plan_gpus and --gpu_memory_gb must be >= 0")
        need(o.plan or o.model == "tiny" or o.data or o.stage == "sft" and o.sft_data,
             f"--model {o.model} needs --data (the built-in synthetic task goes with --model tiny only)")
        need(not (o.stage == "sft" and o.sft_steps == 0), "--stage sft with --sft_steps 0 trains nothing")
        need(o.family in ("", *FAMILY_TYPES),
             f"--family must be one of {', '.join(FAMILY_TYPES)}, got {o.family!r}")
        need(not o.family or o.model == "tiny",
             f"--family {o.family} picks the built-in tiny model's family; --model {o.model}'s family is "
             "the model_type in its config.json")
        _validate_lora(o)
        if o.kernel_impl == "triton" or o.attention in ("flash_attn", "varlen_attn"):
            need(o.device != "cpu", f"--kernel_impl {o.kernel_impl} / --attention {o.attention} need a GPU")


LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def _validate_lora(o) -> None:
    """The LoRA options, before any model loads (the module names against the model itself in
    r1vl.model.lora; --stage sft+grpo under ZeRO-3 against the --deepspeed file at start-up,
    r1vl.run.setup.check_inputs)."""
    if o.lora_rank < 0:
        raise ValueError(f"--lora_rank must be >= 0 (0 = off), got {o.lora_rank}")
    if o.lora_alpha < 0:
        raise ValueError(f"--lora_alpha must be >= 0 (0 = 2 x lora_rank), got {o.lora_alpha}")
    if not 0 <= o.lora_dropout < 1:
        raise ValueError(f"--lora_dropout must be in [0, 1), got {o.lora_dropout}")
    if not o.lora_rank:
        return
    names = [n.strip() for n in o.lora_target_modules.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise ValueError(f"--lora_target_modules must be distinct comma-separated module names, "
                         f"got {o.lora_target_modules!r}")
    if set(names) - set(LORA_MODULES):
        raise ValueError(f"--lora_target_modules: {sorted(set(names) - set(LORA_MODULES))} is not a linear layer of "
                         f"the Qwen-VL decoder layers; choose from {', '.join(LORA_MODULES)}")
    if "lm_head" in names and o.lora_dropout > 0:
        raise ValueError("--lora_dropout must be 0 when --lora_target_modules has lm_head: the fused loss "
                         "reads lm_head as one merged weight, which has no dropout on its input")
    if o.lora_vision and o.freeze_vision_tower:
        raise ValueError("--lora_vision true adapts the vision tower that --freeze_vision_tower true keeps "
                         "as loaded; give --freeze_vision_tower false")


STAGE_CLASSES = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # "sampling" -> SamplingOptions
OPTION_FIELDS = [f for kind in STAGE_CLASSES.values() for f in dataclasses.fields(kind)]  # CLI / --help order
OPTION_STAGE = {f.name: stage for stage, kind in STAGE_CLASSES.items() for f in dataclasses.fields(kind)}
assert len(OPTION_STAGE) == len(OPTION_FIELDS), "an option name is used by two stages: the flat CLI needs them unique"


# The built-in demonstration (`python train.py`): a tiny Qwen2-VL learns the synthetic task on
# two CPU cores in a few minutes. A frozen random vision tower (a trained one collapses and the
# policy answers blind), a warm-up long enough to learn the format, the paper's temperature 1.2
# and G=4, rates far above the paper's (the model is random and tiny), 1024 held-out prompts x 1
# sample (accuracy sd about 0.012 from sampling alone), lengths that fit the synthetic
# solutions, exact answer matching. The measurements behind each value: benchmarks/results/
# learning.md, "Why the built-in run's settings".
TINY_DEFAULTS = dict(
    stage="sft+grpo", sft_steps=250, sft_batch_size=16, sft_lr=2e-3, freeze_vision_tower=True,
    num_steps=150, batch_size=32, temperature=1.2, lr=2e-4,
    max_prompt_length=128, max_completion_length=160, max_pixels=56 * 56, micro_batch_tokens=1024,
    reward_symbolic=False, eval_prompts=1024, eval_generations=1, eval_every=50,
)
# Per family, on top of TINY_DEFAULTS. Qwen3-VL: its image sides are multiples of 32 pixels, so
# the 56-pixel synthetic pictures are read at 64 x 64 (2 x 2 merged tokens, one per quadrant, as
# the 56-pixel ones give Qwen2-VL); and it learns the task more slowly under StepGRPO: after 150
# steps the held-out reward was still rising in 8 of 9 runs (seeds 0-2 x three numerics), and 2
# of them (seed 1, which starts highest) gained less than +0.3 (benchmarks/results/learning.md).
TINY_FAMILY_DEFAULTS = {"qwen3_vl": dict(max_pixels=64 * 64, num_steps=250)}


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# List-valued options: the element type of each tuple field (the CLI takes nargs="+", a file a
# list or a single value).
LIST_OPTIONS = {"tuple[str, ...]": str, "tuple[float, ...]": float}


def _list_option(name: str, value, element: type) -> tuple:
    """A list option's value as a tuple of `element`, a single value as a 1-tuple."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in values:
        if element is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, element) or isinstance(v, bool):
            raise ValueError(f"option {name} must be a list of {element.__name__}, got {value!r}")
        out.append(v)
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="StepGRPO (R1-VL) for Qwen2-VL, Qwen2.5-VL and Qwen3-VL. Run with torchrun for data parallelism. With "
                    "--model tiny (the default) the demo's TINY_DEFAULTS (r1vl/config.py) replace the "
                    "defaults shown below for the options it sets, unless given.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="", help="YAML or JSON file of options (the command line wins)")
    for stage, options in STAGE_CLASSES.items():  # --help lists the options stage by stage
        group = parser.add_argument_group(f"{stage} options", options.__doc__)
        for f in dataclasses.fields(options):
            if f.type in LIST_OPTIONS:  # --name A B C
                shown = " ".join(map(str, f.default)) or "none"
                group.add_argument(f"--{f.name}", type=LIST_OPTIONS[f.type], nargs="+", default=argparse.SUPPRESS,
                                   help=f"{f.metadata['help']} (default: {shown})")
                continue
            kind = {"bool": _parse_bool, "int": int, "float": float, "str": str}[f.type]
            # default=SUPPRESS: only options actually given appear in the namespace, so that
            # the file and TINY_DEFAULTS can fill the rest.
            bare = True if kind is _parse_bool else f.metadata["bare"]
            group.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS,
                               help=f"{f.metadata['help']} (default: {f.default})",
                               **({} if bare is None else {"nargs": "?", "const": bare}))
    return parser


def _read_file(path: str) -> dict:
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values")
    unknown = sorted(set(values) - set(OPTION_STAGE))
    if unknown:
        raise ValueError(f"--config {path}: unknown option(s) {unknown}")
    return values


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """Config from the command line (and --config file), validated. Exits on unknown options."""
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config")
    values = _read_file(path) if path else {}
    values.update(args)
    return make_config(**values)


def make_config(**values) -> Config:
    """Config from keyword values, with TINY_DEFAULTS under them for model=tiny, validated."""
    if values.get("model", ModelOptions.model) == "tiny":
        values = {**TINY_DEFAULTS, **TINY_FAMILY_DEFAULTS.get(values.get("family", ""), {}), **values}
    fields = {f.name: f for f in OPTION_FIELDS}
    for name, value in values.items():
        if name not in fields:
            raise ValueError(f"unknown option {name!r}")
        if fields[name].type in LIST_OPTIONS:
            values[name] = _list_option(name, value, LIST_OPTIONS[fields[name].type])
            continue
        spellings = fields[name].metadata["spellings"]
        spelled = value.lower() if isinstance(value, str) else value
        if isinstance(value, (bool, str)) and spelled in spellings:  # activation_checkpointing true = on
            values[name] = value = spellings[spelled]
        expected = {"bool": bool, "int": int, "float": float, "str": str}[fields[name].type]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
        elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ValueError(f"option {name} must be {expected.__name__}, got {value!r}")
    config = Config.from_flat(values)
    config.validate()
    return config


def to_dict(config: Config) -> dict:
    """The flat {option: value} of a Config (RUN_DIR/config.json, list options as lists): what
    make_config takes back."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.flat().items()}


