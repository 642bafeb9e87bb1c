"""StepGRPO (R1-VL, arXiv 2503.12937): online RL for Qwen2-VL / Qwen2.5-VL / Qwen3-VL with step-wise rewards.

    python train.py                                   # built-in demo: tiny Qwen2-VL, synthetic task, CPU
    python train.py --family qwen3_vl                 # the same demo on a tiny Qwen3-VL
    python train.py --model PATH --data train.jsonl   # a local Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint
    torchrun --nproc_per_node=4 train.py --model PATH --data train.jsonl
    python train.py --stage sft --model PATH --data train.jsonl   # the supervised warm-up only
    python train.py --run_dir runs/a --resume auto    # continue a killed run from its newest checkpoint
    python train.py --help                            # every option, with the paper's defaults
    python train.py --plan --model configs/qwen2_vl_2b.json --gpu_memory_gb 80   # memory per GPU, then exit
    torchrun --nproc_per_node=8 train.py --deepspeed configs/zero3.json --model PATH --data train.jsonl

One GRPO step, per data-parallel rank, each a call into its stage (r1vl/<stage>/):
  1. sample   (r1vl.sampling) prompts_per_step prompts, G completions each: the image and the
              prompt prefilled once per prompt, the KV cache shared by the G, batched decode.
              Prompts longer than max_prompt_length are skipped and counted, never cut.
  2. score    (r1vl.rewards) StepRAR + StepRVR, one reward per completion, or the weighted sum of
              --reward_funcs (the user's run in a worker process, each call with a deadline);
  3. advantages  normalized within each group of G;
  4. update   (r1vl.update) the rollout's sequences packed into micro-batches; old log-probs (only if
              num_iterations > 1) and reference log-probs (if beta > 0, from a frozen copy of
              the initial policy, which sees the image too); num_iterations optimizer steps with
              the fused loss, each micro-batch weighted by its share of the global batch and
              gradients summed over ranks, so the step's gradient is that of the whole batch;
  5. log      (r1vl.run) metrics to the console and RUN_DIR/metrics.jsonl; every save_every
              steps a checkpoint that --resume auto continues from exactly.
The warm-up stage (--stage sft or sft+grpo) trains on the reference solutions first
(cross-entropy on the assistant tokens only), as the paper does.
With --lora_rank R only LoRA adapters train (r1vl.model.lora): the KL reference is the policy
with its adapters off, the warm-up's adapters are folded into the base before StepGRPO, and
RUN_DIR/final/ holds the merged model with the PEFT adapter in final/adapter/.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from r1vl import distributed
from r1vl.config import Config, parse_config
from r1vl.data.records import BadRecordError, load_sft, rank_batches
from r1vl.heldout import HeldOut
from r1vl.model.lora import adapters_off, load_adapter_weights, merge_into_base
from r1vl.model.policy import Policy, load_trainable, save_full_policy
from r1vl.progress import progress_bar
from r1vl.rewards.scorer import Scorer
from r1vl.rewards.worker import RewardFunctionError
from r1vl.run.checkpoints import Checkpointer, ResumePoint, load_rng
from r1vl.run.memory_check import check_plan
from r1vl.run.metrics import (
    MetricsLog,
    Timer,
    UndecidedWarning,
    console_line,
    grpo_step_metrics,
    reward_function_metrics,
)
from r1vl.run.plot import plot_run
from r1vl.run.samples import console_lines, sample_rows
from r1vl.run.setup import check_inputs, quiet_transformers, resume_invariants, resume_point, setup_run_dir, split_data
from r1vl.run.trackers import open_trackers, parse_report_to
from r1vl.sampling.sampler import Sampler, prompt_encoder
from r1vl.tiny import prepare_demo
from r1vl.update.grpo import GRPOUpdate
from r1vl.update.packing import Sequence
from r1vl.update.sft import SFTUpdate


def main(argv=None) -> dict:
    """Parse and check the options (a bad one exits with status 2 and a message), then train."""
    try:
        cfg = parse_config(argv)
        if not cfg.memory.plan:
            check_inputs(cfg)
        # Before any weight is loaded: a plan that does not fit stops here, naming the fixes.
        cfg, plan = check_plan(cfg, cfg.memory.plan_gpus or int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if cfg.memory.plan:
        print(plan.format())
        return {"plan": plan}
    world = distributed.init(cfg.memory.device, always_group=bool(cfg.optimizer.deepspeed))
    try:
        results = train(cfg, world)
    except RewardFunctionError as e:  # the user's code failed: say which, where, why; no traceback
        distributed.destroy(wait_for_others=False)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except BadRecordError as e:  # an image that fails when first decoded (--check_images lazy): named
        distributed.destroy(wait_for_others=False)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BaseException:
        distributed.destroy(wait_for_others=False)
        raise
    distributed.destroy()
    return results


@dataclass
class Run:
    """What both stages share: the options, the ranks, the run directory and its logs."""

    cfg: Config
    world: distributed.Dist
    run_dir: Path
    policy: Policy
    log: MetricsLog
    saver: Checkpointer
    resume: ResumePoint | None  # the checkpoint this run continues from

    def resume_of(self, stage: str) -> ResumePoint | None:
        return self.resume.of_stage(stage) if self.resume is not None else None

    def progress(self, total: int, desc: str, initial: int = 0):
        return progress_bar(total, desc, self.cfg.run.progress and self.world.is_main, initial=initial, leave=True)


def train(cfg: Config, world: distributed.Dist) -> dict:
    """The warm-up and/or StepGRPO, as --stage says (a resumed run skips what it finished)."""
    quiet_transformers()
    torch.manual_seed(cfg.run.seed)
    run_dir = setup_run_dir(cfg, world)
    resume = resume_point(cfg, run_dir, world)
    if cfg.policy.model == "tiny":
        data, model_path = prepare_demo(cfg.dataset, cfg.policy.family, cfg.evaluation.eval_prompts, cfg.run.seed,
                                        run_dir, world)
    else:
        data, model_path = cfg.dataset.data, cfg.policy.model
    policy = load_trainable(policy_source(cfg, resume, model_path), cfg.policy, cfg.dataset, world)
    if resume is not None and cfg.policy.lora_rank:  # the checkpoint holds the adapters, on the base they were trained on
        load_adapter_weights(policy.model, resume.path / "adapter")
    distributed.print0(f"r1vl: {cfg.run.stage} on {world.world_size} rank(s), {world.device}, {policy.model.dtype}, "
                       f"activation checkpointing {cfg.policy.activation_checkpointing}; run dir {run_dir}")
    examples, eval_examples = split_data(data, cfg.dataset, cfg.evaluation.eval_prompts)
    log = MetricsLog(run_dir, world.is_main, resumed_at=(resume.stage, resume.step) if resume else None,
                     tensorboard="tensorboard" in parse_report_to(cfg.run.report_to),
                     trackers=open_trackers(cfg, run_dir, world.is_main, resuming=resume is not None))
    stages = cfg.run.stages
    saver = Checkpointer(run_dir, cfg.run.save_every, cfg.run.keep_last, cfg.sft.sft_steps if "sft" in stages else 0,
                         world, resume_invariants(cfg))
    run = Run(cfg, world, run_dir, policy, log, saver, resume)
    results: dict = {}
    try:
        warmed_up = False
        if "sft" in stages and not (resume is not None and resume.stage == "grpo"):
            train_sft(run, examples)
            warmed_up = True
            if cfg.policy.lora_rank and "grpo" in stages:
                # The warm-up's adapters folded into the base, fresh ones for StepGRPO: its KL
                # reference (the adapters off) is then the warmed-up policy, as without LoRA.
                merge_into_base(policy.model, cfg.policy)
        if "grpo" in stages:
            # The KL reference is the policy as GRPO starts: the --model directory itself,
            # unless a warm-up changed it or it came from a trainer checkpoint (which rotation
            # deletes); then it is written to RUN_DIR/reference.
            source = None if warmed_up or resume is not None else str(Path(model_path).resolve())
            results = train_grpo(run, examples, eval_examples, source)
    finally:
        log.close()
    return finish(run, {"run_dir": str(run_dir), **results})


# -------------------------------------------------------------------------------- the warm-up


def train_sft(run: Run, examples: list) -> None:
    """Supervised warm-up on the --sft_data solutions, else on the RL data's own."""
    cfg, world = run.cfg, run.world
    options, steps = cfg.sft, cfg.sft.sft_steps
    encoder = prompt_encoder(run.policy, cfg.dataset)
    if cfg.dataset.sft_data:
        sft_examples, encode = load_sft(cfg.dataset.sft_data, cfg.dataset.image_root or None).items, encoder.sft
    else:
        sft_examples, encode = examples, encoder.solution
    update = SFTUpdate(run.policy, options, cfg.optimizer, cfg.memory, world, encode, idle_sequence(encoder))
    start = _resume_stage(run, "sft", update.engine)
    stream = rank_batches(sft_examples, options.sft_batch_size, world.rank, world.world_size, cfg.run.seed + 1,
                          skip=start)
    update.engine.train()
    for step in range(start + 1, steps + 1):
        t0 = time.perf_counter()
        record = {"stage": "sft", "step": step, **update(next(stream))}
        record["tokens_per_s"] = record["tokens"] / (time.perf_counter() - t0) / world.world_size
        run.log.log(record)
        if step % cfg.run.log_every == 0 or step == steps:
            distributed.print0(console_line(record))
        if run.saver.due(step, steps):
            run.saver.save(run.policy, update.engine, "sft", step, {})
    update.engine.eval()
    update.engine.close()


# -------------------------------------------------------------------------------- StepGRPO


def train_grpo(run: Run, examples: list, eval_examples: list, reference_source: str | None) -> dict:
    """StepGRPO. Returns the held-out evaluation before and after (empty without eval_prompts).

    reference_source: a directory holding the weights GRPO starts from (the KL reference),
    recorded in checkpoints so that a resumed run can load it; None = write them to
    RUN_DIR/reference first if checkpoints are on."""
    cfg, world = run.cfg, run.world
    num_steps, eval_every = cfg.objective.num_steps, cfg.evaluation.eval_every
    generator = torch.Generator(world.device).manual_seed(cfg.run.seed * 1000 + world.rank)
    timer = Timer(world.device)
    sampler = Sampler(run.policy, cfg.sampling, prompt_encoder(run.policy, cfg.dataset), generator)
    scorer = Scorer(cfg.reward, cfg.sampling.num_generations, world, num_steps=cfg.objective.num_steps)
    update = GRPOUpdate(run.policy, cfg.objective, cfg.sampling, cfg.optimizer, cfg.memory, world,
                        idle_sequence(sampler.encoder), timer)
    update.reference, reference_source = kl_reference(run, update, reference_source)
    held_out = HeldOut(sampler, scorer, eval_examples, cfg.evaluation, world, batch_size=cfg.sampling.batch_size,
                       seed=cfg.run.seed)
    resume = run.resume_of("grpo")
    before = resume.before if resume is not None else report("before", evaluate(held_out, update))
    start = _resume_stage(run, "grpo", update.engine, {"rollout": generator})
    stream = rank_batches(examples, cfg.sampling.prompts_per_step, world.rank, world.world_size, cfg.run.seed,
                          skip=start)
    progress, warn_undecided = run.progress(num_steps, "StepGRPO", initial=start), UndecidedWarning()
    curve = {}  # step -> held-out evaluation, every --eval_every steps
    for step in range(start + 1, num_steps + 1):
        t0 = time.perf_counter()
        with timer("sample"), update.engine.gathered():  # ZeRO-3: whole weights for decoding
            rollout = sampler.sample(next(stream))  # 1. sample
        with timer("score"):
            rewards = scorer.score_step(rollout, step)  # 2. score
            advantages = scorer.advantages(rewards)  # 3. advantages
        batch, numbers = update(rollout, advantages)  # 4. update: packs its own batch
        seconds = time.perf_counter() - t0
        record = {"stage": "grpo", "step": step, "reward_funcs": " ".join(cfg.reward.reward_funcs),  # 5. log
                  "lr": update.engine.lr, **grpo_step_metrics(rollout, rewards.breakdown, batch, numbers, seconds, world),
                  **reward_function_metrics(rewards, world),
                  "skipped_updates": update.engine.skipped, **timer.pop(), "time_step": seconds}
        if eval_every and eval_examples and (step % eval_every == 0 or step == num_steps):
            with timer("eval"):  # a learning curve; not counted in time_step
                curve[step] = evaluate(held_out, update)
            record.update({f"eval_{k}": v for k, v in curve[step].items()}, **timer.pop())
        log_step(run, record, progress, warn_undecided)
        every = cfg.run.log_completions_every
        if world.is_main and every and step % every == 0:
            log_completions(run, sample_rows(step, rollout, rewards, advantages, cfg.run.log_completions_prompts),
                            progress)
        if run.saver.due(step, num_steps):
            run.saver.save(run.policy, update.engine, "grpo", step, {"before": before, "reference": reference_source},
                           {"rollout": generator})
    progress.close()
    # The curve's point at the last step is the final evaluation (the same seed, the same policy).
    after = report("after", curve.get(num_steps) or evaluate(held_out, update))
    update.close()
    return {"before": before, "after": after}


def evaluate(held_out: HeldOut, update: GRPOUpdate) -> dict:
    with update.engine.gathered():
        return held_out()


def report(when: str, result: dict) -> dict:
    if result:
        distributed.print0(f"{when} GRPO: ".ljust(13) + json.dumps({k: round(v, 4) for k, v in result.items()}))
    return result


def log_step(run: Run, record: dict, progress, warn_undecided: UndecidedWarning) -> None:
    run.log.log(record)
    step = record["step"]
    if run.world.is_main:
        warn_undecided(record["undecided"], step)
    # The postfix first: off a terminal, update() prints the step's line with it.
    progress.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['accuracy']:.2f}", refresh=False)
    progress.update(1)
    if run.world.is_main and (step % run.cfg.run.log_every == 0 or step == run.cfg.objective.num_steps):
        progress.write(console_line(record), file=sys.stdout)


def log_completions(run: Run, rows: list[dict], progress) -> None:
    """Rank 0's sample completions to samples.jsonl and the trackers; the short form on the
    console when the step is also a --log_every step."""
    run.log.log_samples(rows, rows[0]["step"] if rows else 0)
    if rows and rows[0]["step"] % run.cfg.run.log_every == 0:
        for line in console_lines(rows):
            progress.write(line, file=sys.stdout)


def kl_reference(run: Run, update: GRPOUpdate, source: str | None):
    """The KL reference (None when beta = 0): the policy as it starts GRPO, frozen; a resumed
    run loads it from where its checkpoint says. Returns (reference, its directory): `source`
    unless the weights had to be written first (RUN_DIR/reference, when checkpoints are on),
    the directory a resumed run will load."""
    cfg, resume = run.cfg, run.resume_of("grpo")
    if cfg.policy.lora_rank:
        # The reference is the base the adapters sit on, which a resumed run also loads (the
        # checkpoint holds only the adapters): written out if it is not a directory already.
        if source is None and resume is None and run.saver.save_every > 0:
            with adapters_off(run.policy.model):
                save_full_policy(run.policy, run.run_dir / "reference", run.world)
            source = str((run.run_dir / "reference").resolve())
        return (update.engine.reference() if cfg.objective.beta > 0 else None), (resume.reference if resume else source)
    if cfg.objective.beta == 0:
        return None, source
    if resume is not None:
        reference = load_trainable(resume.reference, cfg.policy, cfg.dataset, run.world).model
        return update.engine.reference(reference), resume.reference
    reference = update.engine.reference()
    if source is None and run.saver.save_every > 0:
        final = run.run_dir / "reference"
        save_full_policy(run.policy, final, run.world)
        source = str(final.resolve())
    return reference, source


# -------------------------------------------------------------------------------- helpers


def policy_source(cfg: Config, resume: ResumePoint | None, model_path: str) -> str:
    """The directory the policy loads from: --model, or a checkpoint's policy; with LoRA the
    base the checkpoint's adapters were trained on (--model in the warm-up, the KL reference's
    directory in StepGRPO)."""
    if resume is None:
        return model_path
    if not cfg.policy.lora_rank:
        return str(resume.path / "policy")
    return resume.reference if resume.stage == "grpo" and resume.reference else model_path


def idle_sequence(encoder) -> Sequence:
    """One blank-image sequence: what a rank with fewer micro-batches runs, weighted 0, when
    its engine keeps ranks in lockstep (ZeRO)."""
    prompt = encoder.blank()
    return Sequence(prompt.ids, prompt.ids[-1:], prompt.pixel_values, prompt.image_grid_thw)


def _resume_stage(run: Run, stage: str, engine, generators: dict | None = None) -> int:
    """The optimizer steps of `stage` already done: 0, or a checkpoint's, whose engine and
    random states are then restored."""
    resume = run.resume_of(stage)
    if resume is None:
        return 0
    engine.load_state(resume.path)
    load_rng(resume.path, run.world.rank, generators)
    return resume.step


def finish(run: Run, results: dict) -> dict:
    """The ranks' weight digests, the final policy, results.json, the curves, the summary line."""
    cfg, world, run_dir = run.cfg, run.world, run.run_dir
    results["weight_digests"] = distributed.weight_digests(run.policy.model)
    if len(set(results["weight_digests"])) > 1:
        distributed.print0("WARNING: the ranks' weights differ: " + ", ".join(results["weight_digests"]))
    if cfg.run.save_final:
        save_full_policy(run.policy, run_dir / "final", world)
        distributed.print0(f"final policy saved to {run_dir / 'final'}")
    if world.is_main:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if "grpo" in cfg.run.stages:
            print(f"curves: {plot_run(run_dir)}", flush=True)
        if results.get("before"):
            b, a = results["before"], results["after"]
            print(f"mean reward {b['reward']:.3f} -> {a['reward']:.3f}   accuracy {b['accuracy']:.3f} -> "
                  f"{a['accuracy']:.3f}   (held-out prompts, before -> after StepGRPO)", flush=True)
    return results


if __name__ == "__main__":
    main()
