"""The trainer's options: one flat dataclass, a CLI generated from its fields, an optional file.

    python train.py --lr 2e-6 --num_generations 8
    python train.py --config run.yaml --beta 0        # the command line wins over the file

Defaults are the paper's (R1-VL, StepGRPO on Qwen2-VL-2B). With `--model tiny` (the
default) the built-in CPU demonstration runs, and the fields in TINY_DEFAULTS take the
values that make it finish in minutes on two cores, unless given on the command line or in
the file. Every contradiction is refused at start-up by `Config.validate`.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from r1vl.deepspeed_config import read_deepspeed_config
from r1vl.model.families import FAMILIES
from r1vl.rewards.functions import DEFAULT_REWARD_FUNCS, parse_reward_funcs

STAGES = ("grpo", "sft", "sft+grpo")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTENTIONS = ("auto", "flash_attn", "varlen_attn", "sdpa", "sdpa_masked")


def option(default, help: str, bare=None):
    """A Config field with its --help text. bare: the value of the option given without one
    (booleans: True)."""
    return dataclasses.field(default=default, metadata={"help": help, "bare": bare})


@dataclass
class Config:
    # --- what to train, on what
    model: str = option(
        "tiny", '"tiny" (built-in tiny model from a config, --family) or a local Qwen2-VL / Qwen2.5-VL / '
                'Qwen3-VL HF directory')
    family: str = option(
        "", 'the built-in tiny model\'s family with --model tiny: qwen2_vl (""), qwen2_5_vl or qwen3_vl; '
            'a checkpoint\'s family is its config.json\'s model_type')
    stage: str = option("grpo", '"grpo", "sft" (warm-up only) or "sft+grpo"')
    data: str = option("", 'RL data, R1-VL-10K style JSON/JSONL; "" with model=tiny writes the synthetic task')
    sft_data: str = option("", "SFT data, chat form (r1vl.data.records.load_sft); \"\" = the RL data's solutions")
    image_root: str = option("", "directory image paths are relative to; \"\" = the data file's directory")
    run_dir: str = option("", 'where metrics, the config and the final policy go; "" = runs/<time>')
    seed: int = option(0, "seeds data order, sampling and the tiny model")
    save_final: bool = option(True, "save the final policy (safetensors) with its tokenizer and processor")
    save_every: int = option(100, "trainer checkpoint every K optimizer steps of each stage and at its end; 0 = none")
    keep_last: int = option(2, "trainer checkpoints kept in RUN_DIR/checkpoints (the newest)")
    resume: str = option(
        "", '"auto" = the newest complete checkpoint in --run_dir (none: start afresh), or a checkpoint dir')

    # --- rollout
    num_generations: int = option(4, "G, completions per prompt")
    batch_size: int = option(4, "completions per rank per optimizer step, a multiple of G")
    temperature: float = option(1.2, "sampling temperature, also the loss's logit temperature")
    top_p: float = option(1.0, "nucleus sampling; 1.0 = off")
    max_prompt_length: int = option(512, "tokens incl. image tokens; longer prompts are skipped, never cut")
    max_completion_length: int = option(1024, "tokens sampled per completion at most")
    max_pixels: int = option(400000, "images are resized to at most this many pixels")
    min_pixels: int = option(3136, "... and at least this many (56 x 56)")
    ignore_eos: bool = option(
        False, "benchmarks: decode exactly max_completion_length tokens per completion (no stop at EOS)")

    # --- StepGRPO objective
    num_steps: int = option(500, "GRPO steps (one rollout each)")
    beta: float = option(0.04, "KL coefficient (k3 estimator) to the frozen reference")
    epsilon_low: float = option(0.2, "clip range below 1")
    epsilon_high: float = option(0.2, "clip range above 1")
    loss_type: str = option("grpo", "grpo / bnpo / dr_grpo / dapo (TRL's reductions)")
    scale_rewards: str = option("group", "advantage scaling: group / batch / none")
    num_iterations: int = option(1, "optimizer steps per rollout; > 1 computes old log-probs")
    reward_alpha: float = option(0.1, "weight of the key-step match in StepRAR")
    reward_normalize: bool = option(False, "lenient answer / key-step matching (off = the paper's rule)")
    reward_symbolic: bool = option(True, "math-verify equivalence of answers")
    loss_softmax: str = option(
        "float32", "the loss's softmax: float32 (fused kernels) or float64 (eager; a numerics check)")

    # --- reward functions (r1vl.rewards.functions; docs/reward_functions.md). New block: to be
    # moved into the rewards stage's options with the nested Config.
    reward_funcs: tuple[str, ...] = option(
        DEFAULT_REWARD_FUNCS, "what the advantages are computed from: steprar / steprvr / accuracy (built-ins), "
                              "path/to/file.py:function or package.module:function (TRL's reward signature)")
    reward_weights: tuple[float, ...] = option((), "one weight per --reward_funcs entry; none given = all 1")
    reward_timeout_s: float = option(
        300.0, "wall time one user reward function may take on one step's completions; past it the run stops")

    # --- optimisation
    lr: float = option(1e-6, "AdamW learning rate of the GRPO stage")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay")
    adam_beta1: float = option(0.9, "AdamW first-moment decay")
    adam_beta2: float = option(0.999, "AdamW second-moment decay")
    lr_schedule: str = option("constant", "constant / linear / cosine decay after warm-up")
    warmup_steps: int = option(0, "optimizer steps of linear warm-up")
    max_grad_norm: float = option(1.0, "clip the global gradient norm; 0 = off")
    micro_batch_tokens: int = option(16384, "token budget of one packed micro-batch (forward + backward)")
    share_prompts: bool = option(
        True, "pack each prompt once per group [prompt, c1..cG] in the update and log-prob forwards")
    max_bad_steps: int = option(3, "stop after this many updates skipped for a non-finite loss or gradient")
    activation_checkpointing: str = option(
        "auto", "recompute each decoder layer and vision block in backward: on (also the bare flag) / off / "
                "auto (on when the memory plan without it does not fit the GPU; off on a CPU)", bare="on")
    freeze_vision_tower: bool = option(
        False, "keep the vision tower (ViT blocks and patch merger) as loaded, in the warm-up and in StepGRPO")

    # --- SFT warm-up (stage sft / sft+grpo)
    sft_steps: int = option(200, "optimizer steps")
    sft_batch_size: int = option(8, "examples per rank per step")
    sft_lr: float = option(2e-5, "the paper's warm-up rate for the 2B model")

    # --- hardware
    device: str = option("auto", '"auto" (cuda if available), "cpu", "cuda"')
    dtype: str = option("auto", "auto = bfloat16 on GPU, float32 on CPU")
    kernel_impl: str = option("auto", "r1vl_kernels impl: auto = triton on CUDA, torch on CPU")
    attention: str = option(
        "auto", "packed attention backend: auto / flash_attn / varlen_attn / sdpa / sdpa_masked (opt-in)")
    deepspeed: str = option(
        "", 'a DeepSpeed JSON config (configs/zero2.json, configs/zero3.json); "" = plain data parallelism')

    # --- the memory plan (r1vl.run.memory_plan), checked at every start
    plan: bool = option(False, "print the memory plan per GPU and exit; --model may be a config JSON file")
    plan_gpus: int = option(0, "GPUs the plan is for; 0 = this run's world size")
    gpu_memory_gb: float = option(0.0, "device memory (GiB) the plan is checked against; 0 = the GPU's own, none on a CPU run")

    # --- logging and evaluation
    eval_prompts: int = option(0, "held-out prompts scored before and after training; 0 = none")
    eval_every: int = option(
        0, "also score them every K StepGRPO steps (a learning curve); 0 = before and after only")
    eval_generations: int = option(0, "samples per held-out prompt; 0 = num_generations")
    log_every: int = option(1, "console line every N steps (the JSONL gets every step)")
    progress: bool = option(True, "tqdm progress bars on rank 0")

    # --- watching a run: sample completions and experiment trackers (r1vl.run.samples, r1vl.run.trackers)
    log_completions_every: int = option(
        10, "every K StepGRPO steps, a few prompts with all G completions, their rewards and advantages "
            "to RUN_DIR/samples.jsonl and the trackers; 0 = none")
    log_completions_prompts: int = option(2, "prompts (each with its G completions) per --log_completions_every")
    report_to: str = option(
        "tensorboard", 'comma-separated trackers: none, tensorboard, wandb, mlflow, swanlab or all '
                       "(wandb, mlflow, swanlab: pip install '.[trackers]')")
    run_name: str = option("", "the run's name in the trackers; \"\" = the run directory's name")
    tracker_project: str = option("r1vl", "wandb / swanlab project, MLflow experiment")

    def validate(self) -> None:
        """Raise ValueError naming the option for anything unusable or contradictory."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.stage in STAGES, f"--stage must be one of {STAGES}, got {self.stage!r}")
        need(self.loss_type in LOSS_TYPES, f"--loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        need(self.scale_rewards in ("group", "batch", "none"),
             f"--scale_rewards must be group, batch or none, got {self.scale_rewards!r}")
        need(self.lr_schedule in SCHEDULES, f"--lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        need(self.dtype in DTYPES, f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(self.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {self.device!r}")
        need(self.kernel_impl in ("auto", "torch", "triton"),
             f"--kernel_impl must be auto, torch or triton, got {self.kernel_impl!r}")
        need(self.attention in ATTENTIONS, f"--attention must be one of {ATTENTIONS}, got {self.attention!r}")
        need(self.reward_timeout_s > 0, f"--reward_timeout_s must be > 0, got {self.reward_timeout_s}")
        parse_reward_funcs(self.reward_funcs, self.reward_weights)  # syntax, files, weights; the worker imports
        need(self.loss_softmax in ("float32", "float64"),
             f"--loss_softmax must be float32 or float64, got {self.loss_softmax!r}")
        need(not (self.loss_softmax == "float64" and self.loss_type != "grpo"),
             f"--loss_softmax float64 (the eager check) implements --loss_type grpo only, got {self.loss_type!r}")
        need(self.num_generations >= 2,
             f"--num_generations must be >= 2 (advantages are relative within a group), got {self.num_generations}")
        need(self.batch_size >= 1 and self.batch_size % self.num_generations == 0,
             f"--batch_size ({self.batch_size}) must be a positive multiple of --num_generations "
             f"({self.num_generations}): every prompt brings all G of its completions")
        need(self.beta >= 0, f"--beta must be >= 0, got {self.beta}")
        need(self.temperature > 0, f"--temperature must be > 0, got {self.temperature}")
        need(0 < self.top_p <= 1, f"--top_p must be in (0, 1], got {self.top_p}")
        need(self.epsilon_low >= 0 and self.epsilon_high >= 0, "--epsilon_low and --epsilon_high must be >= 0")
        for name in ("max_prompt_length", "max_completion_length", "num_iterations", "micro_batch_tokens",
                     "sft_batch_size", "log_every", "max_bad_steps"):
            need(getattr(self, name) >= 1, f"--{name} must be >= 1, got {getattr(self, name)}")
        need(self.keep_last >= 1, f"--keep_last must be >= 1, got {self.keep_last}")
        need(not (self.resume == "auto" and not self.run_dir),
             "--resume auto looks for checkpoints in --run_dir; give the run directory of the run to continue")
        from r1vl.run.trackers import parse_report_to  # noqa: PLC0415 (no tracker imported here)
        parse_report_to(self.report_to)
        need(self.log_completions_every >= 0 and self.log_completions_prompts >= 1,
             "--log_completions_every must be >= 0 and --log_completions_prompts >= 1")
        for name in ("num_steps", "sft_steps", "warmup_steps", "eval_prompts", "eval_every", "eval_generations",
                     "min_pixels", "save_every"):
            need(getattr(self, name) >= 0, f"--{name} must be >= 0, got {getattr(self, name)}")
        need(self.max_pixels >= self.min_pixels,
             f"--max_pixels ({self.max_pixels}) must be >= --min_pixels ({self.min_pixels})")
        need(self.micro_batch_tokens >= self.max_prompt_length + self.max_completion_length,
             f"--micro_batch_tokens ({self.micro_batch_tokens}) must hold one whole sequence: at least "
             f"--max_prompt_length + --max_completion_length = {self.max_prompt_length + self.max_completion_length}")
        need(self.lr > 0 and self.sft_lr > 0, "--lr and --sft_lr must be > 0")
        need(self.max_grad_norm >= 0, f"--max_grad_norm must be >= 0, got {self.max_grad_norm}")
        need(self.activation_checkpointing in ("auto", "on", "off"),
             f"--activation_checkpointing must be auto, on or off, got {self.activation_checkpointing!r}")
        need(self.plan_gpus >= 0 and self.gpu_memory_gb >= 0, "--plan_gpus and --gpu_memory_gb must be >= 0")
        need(self.plan or self.model == "tiny" or self.data or self.stage == "sft" and self.sft_data,
             f"--model {self.model} needs --data (the built-in synthetic task goes with --model tiny only)")
        need(not (self.stage == "sft" and self.sft_steps == 0), "--stage sft with --sft_steps 0 trains nothing")
        need(self.family in ("", *FAMILIES),
             f"--family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        need(not self.family or self.model == "tiny",
             f"--family {self.family} picks the built-in tiny model's family; --model {self.model}'s family is "
             "the model_type in its config.json")
        if self.kernel_impl == "triton" or self.attention in ("flash_attn", "varlen_attn"):
            need(self.device != "cpu", f"--kernel_impl {self.kernel_impl} / --attention {self.attention} need a GPU")
        if self.deepspeed:
            self.deepspeed_json  # read and checked here, at start-up; kept for the engines

    @functools.cached_property
    def deepspeed_json(self) -> dict | None:
        """The --deepspeed file's JSON, read and checked against these options once (None
        without --deepspeed); r1vl.deepspeed_config says what it may hold."""
        if not self.deepspeed:
            return None
        return read_deepspeed_config(self.deepspeed, self.dtype, self.max_grad_norm)

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages to run, in order: ("sft",), ("grpo",) or ("sft", "grpo")."""
        return tuple(self.stage.split("+"))

    @property
    def prompts_per_step(self) -> int:
        """Prompts each rank samples per GRPO step."""
        return self.batch_size // self.num_generations


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
_LISTS = {"tuple[str, ...]": str, "tuple[float, ...]": float}


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
    for f in dataclasses.fields(Config):
        if f.type in _LISTS:  # --name A B C
            shown = " ".join(map(str, f.default)) or "none"
            parser.add_argument(f"--{f.name}", type=_LISTS[f.type], nargs="+", default=argparse.SUPPRESS,
                                help=f"{f.metadata['help']} (default: {shown})")
            continue
        kind = {"bool": _parse_bool, "int": int, "float": float, "str": str}[f.type]
        # default=SUPPRESS: only options actually given appear in the namespace, so that
        # the file and TINY_DEFAULTS can fill the rest.
        bare = True if kind is _parse_bool else f.metadata["bare"]
        parser.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS,
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
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - known)
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
    if values.get("model", Config.model) == "tiny":
        values = {**TINY_DEFAULTS, **TINY_FAMILY_DEFAULTS.get(values.get("family", ""), {}), **values}
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    for name, value in values.items():
        if name not in types:
            raise ValueError(f"unknown option {name!r}")
        if types[name] in _LISTS:
            values[name] = _list_option(name, value, _LISTS[types[name]])
            continue
        expected = {"bool": bool, "int": int, "float": float, "str": str}[types[name]]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
        elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ValueError(f"option {name} must be {expected.__name__}, got {value!r}")
    config = Config(**values)
    config.validate()
    return config


def to_dict(config: Config) -> dict:
    """The options as JSON holds them (list options as lists), as config.json is read back."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


