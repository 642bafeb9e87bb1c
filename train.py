"""StepGRPO (R1-VL, arXiv 2503.12937): online RL for Qwen2-VL with step-wise rewards.

    python train.py                                   # built-in demo: tiny Qwen2-VL, synthetic task, CPU
    python train.py --model PATH --data train.jsonl   # a local Qwen2-VL / Qwen2.5-VL checkpoint
    torchrun --nproc_per_node=4 train.py --model PATH --data train.jsonl
    python train.py --stage sft --model PATH --data train.jsonl   # the supervised warm-up only
    python train.py --run_dir runs/a --resume auto    # continue a killed run from its newest checkpoint
    python train.py --help                            # every option, with the paper's defaults
    python train.py --plan --model configs/qwen2_vl_2b.json --gpu_memory_gb 80   # memory per GPU, then exit
    torchrun --nproc_per_node=8 train.py --deepspeed configs/zero3.json --model PATH --data train.jsonl

One GRPO step, per data-parallel rank (train_grpo):
  1. rollout: prompts_per_step prompts, G completions each (r1vl.rollout: the image and the
     prompt prefill once per prompt, KV cache expanded to G, batched decode). Prompts longer
     than max_prompt_length are skipped and counted, never cut.
  2. rewards: StepRAR + StepRVR (r1vl.rewards), one example per completion; advantages
     normalized within each group of G; the completions packed into micro-batches.
  3. update (r1vl.grpo): old log-probs (only if num_iterations > 1) and reference log-probs
     (if beta > 0, from a frozen copy of the initial policy, which sees the image too), then
     num_iterations optimizer steps over all packed micro-batches with the fused loss; each
     micro-batch's loss is weighted by its share of the global batch and gradients are summed
     over ranks, so the step's gradient is that of the whole batch.
  4. metrics to the console and RUN_DIR/metrics.jsonl; every save_every steps a checkpoint
     (r1vl.checkpoints) that --resume auto continues from exactly.
The warm-up stage (--stage sft or sft+grpo) trains on the reference solutions first
(cross-entropy on the assistant tokens only), as the paper does.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from r1vl import distributed
from r1vl.activation_checkpointing import enable_activation_checkpointing
from r1vl.attention import use_varlen_attention
from r1vl.checkpoints import Checkpointer, ResumePoint, find_resume_point, load_rng, open_resume_point
from r1vl.config import Config, parse_config, to_dict
from r1vl.data import load_examples, load_sft
from r1vl.engine import make_engine
from r1vl.grpo import Rollout, grpo_update
from r1vl.losses import kernel_impl, sft_loss_sum, step_advantages
from r1vl.memory_plan import check_plan
from r1vl.metrics import MetricsLog, Timer, UndecidedWarning, console_line, peak_memory_gb, reduce_over_ranks
from r1vl.model import vision_tower
from r1vl.packing import Sample, pack, plan_microbatches, plan_shared_microbatches
from r1vl.plot import plot_run
from r1vl.policy import Policy, check_checkpoint_dir, load_policy, save_full_policy
from r1vl.prompts import Prompt, PromptEncoder
from r1vl.reward_sets import trained_reward
from r1vl.rewards import RewardConfig, score_groups
from r1vl.rollout import Completions, generate

# -------------------------------------------------------------------------------- helpers


def batches(items: list, per_rank: int, world: distributed.Dist, seed: int, skip: int = 0):
    """Endless per-rank batches: each epoch a seeded permutation of `items`, cut into global
    batches of per_rank * world_size; rank r takes its own slice, so ranks see different items.
    The first `skip` batches are passed over (a resumed run's data position)."""
    if len(items) < per_rank * world.world_size:
        raise ValueError(f"{len(items)} examples cannot fill one global batch of {per_rank} x {world.world_size} ranks")
    generator, step = torch.Generator().manual_seed(seed), per_rank * world.world_size
    while True:
        order = torch.randperm(len(items), generator=generator).tolist()
        for start in range(0, len(order) - step + 1, step):
            if skip > 0:
                skip -= 1
                continue
            mine = order[start + world.rank * per_rank: start + (world.rank + 1) * per_rank]
            yield [items[i] for i in mine]


def packed_microbatches(samples: list[Sample], groups: list[int], model, cfg: Config, device) -> tuple[list, int]:
    """The rank's sequences as packed micro-batches of at most micro_batch_tokens tokens, and
    how many prompt groups did not fit one micro-batch whole. With share_prompts the G
    completions of a prompt share one copy of it (r1vl.packing); otherwise the siblings stay
    together where they fit, so that their image is encoded once."""
    if cfg.share_prompts:
        shared = plan_shared_microbatches(samples, cfg.micro_batch_tokens)
        return [(idx, pack([samples[i] for i in idx], model, share_prompts=True).to(device))
                for idx in shared.microbatches], shared.split_groups
    lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in samples]
    plan = plan_microbatches(lengths, cfg.micro_batch_tokens, groups=groups)
    return [(idx, pack([samples[i] for i in idx], model).to(device)) for idx in plan], 0


def filler_microbatch(policy: Policy, encoder: PromptEncoder, device):
    """A packed batch of one blank-image sequence: what a rank with fewer micro-batches runs,
    weighted 0, when the engine keeps ranks in lockstep (engine.lockstep)."""
    prompt = encoder.blank()
    return pack([Sample(prompt.ids, prompt.ids[-1:], prompt.pixel_values, prompt.image_grid_thw)],
                policy.model).to(device)


def prompt_encoder(policy: Policy, cfg: Config) -> PromptEncoder:
    merge = policy.model.config.vision_config.spatial_merge_size
    return PromptEncoder(policy.tokenizer, policy.image_processor, merge, cfg.max_pixels, cfg.min_pixels)


def eos_token_ids(policy: Policy) -> list[int]:
    return sorted({policy.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")})


# -------------------------------------------------------------------------------- rollout


@dataclass
class Scored:
    """Sampled and scored completions of one batch of prompts (before any packing)."""

    prompts: list[Prompt]
    completions: Completions  # P*G, prompt-major (p*G + g)
    rewards: object  # r1vl.rewards.RewardBreakdown of P*G entries
    skipped: int  # prompts over max_prompt_length


def sample_and_score(policy: Policy, encoder: PromptEncoder, examples, cfg: Config, generator, eos_ids,
                     reward_cfg) -> Scored:
    """Encode, sample G completions per prompt, score."""
    prompts, skipped = [], 0
    for example in examples:
        prompt = encoder.prompt(example)
        if prompt.ids.numel() > cfg.max_prompt_length:
            skipped += 1  # cutting would drop image tokens; skip and count instead
        else:
            prompts.append(prompt)
    completions = generate(policy.model, prompts, cfg.num_generations, cfg.max_completion_length,
                           [] if cfg.ignore_eos else eos_ids,
                           temperature=cfg.temperature, top_p=cfg.top_p, generator=generator)
    texts = [policy.tokenizer.decode(ids, skip_special_tokens=True) for ids in completions.ids]
    G = cfg.num_generations
    grouped = [texts[p * G:(p + 1) * G] for p in range(len(prompts))]
    rewards = score_groups(grouped, [p.example for p in prompts], reward_cfg)
    return Scored(prompts, completions, rewards, skipped)


def rollout(policy: Policy, encoder: PromptEncoder, examples, cfg: Config, world, generator, eos_ids,
            reward_cfg) -> Rollout:
    """Sample and score, then the advantages and the packed micro-batches (every rank calls
    this: "batch" advantages reduce over ranks)."""
    scored = sample_and_score(policy, encoder, examples, cfg, generator, eos_ids, reward_cfg)
    G = cfg.num_generations
    samples = [Sample(p.ids, ids, p.pixel_values, p.image_grid_thw)
               for p, ids in zip([p for p in scored.prompts for _ in range(G)], scored.completions.ids)]
    trained = trained_reward(scored.rewards, cfg.rewards)  # --rewards: the components trained on
    advantages = step_advantages(torch.as_tensor(trained, dtype=torch.float32), G, cfg.scale_rewards,
                                 lambda values: distributed.all_reduce_sum(values, world.device))
    micro, split_groups = packed_microbatches(samples, [i // G for i in range(len(samples))], policy.model, cfg,
                                              world.device)
    return Rollout(scored.prompts, samples, scored.completions.stopped, scored.rewards, advantages, scored.skipped,
                   micro, split_groups, scored.completions.decode_slots)


def evaluate(policy: Policy, encoder: PromptEncoder, examples, cfg: Config, world, eos_ids, reward_cfg,
             seed: int) -> dict:
    """Mean reward and accuracy of eval_generations (0: G) sampled completions on the held-out
    prompts (split over ranks), batch_size completions at a time. The full reward (StepRAR +
    StepRVR), whatever --rewards trains on. The same seed each time: successive evaluations
    draw the same random numbers, so their differences are the policy's, less sampling noise."""
    if not examples:
        return {}
    generator = torch.Generator(world.device).manual_seed(seed + world.rank)
    sums = {"reward": 0.0, "accuracy": 0.0, "step_rvr": 0.0, "completions": 0}
    mine = examples[world.rank::world.world_size]
    cfg = dataclasses.replace(cfg, num_generations=cfg.eval_generations or cfg.num_generations)
    per_chunk = max(cfg.batch_size // cfg.num_generations, 1)
    for start in range(0, len(mine), per_chunk):
        r = sample_and_score(policy, encoder, mine[start:start + per_chunk], cfg, generator, eos_ids,
                             reward_cfg).rewards
        for key, value in (("reward", r.total.sum()), ("accuracy", r.accuracy.sum()), ("step_rvr", r.step_rvr.sum()),
                           ("completions", len(r))):
            sums[key] += value
    total = reduce_over_ranks(sums, world.device)
    n = max(total.pop("completions"), 1)
    return {k: v / n for k, v in total.items()}


def grpo_metrics(batch: Rollout, update: dict, G: int, seconds: float, world) -> dict:
    """The step's numbers, reduced over ranks: per completion, per completion token, totals."""
    r = batch.rewards
    lengths = [len(s.completion_ids) for s in batch.samples]
    packed_tokens = [pb.num_tokens for _, pb in batch.microbatches]
    groups = r.total.reshape(-1, G) if batch.samples else None
    per_completion = {"reward": r.total.sum(), "accuracy": r.accuracy.sum(), "step_rar": r.step_rar.sum(),
                      "step_rvr": r.step_rvr.sum(), "key_step_match": r.key_step_match.sum(),
                      "has_answer": r.has_answer.sum(), "undecided": r.undecided.sum(),
                      "truncated": (~batch.stopped).sum(),
                      "completion_len": sum(lengths)}
    per_token = {k: update[k] for k in ("kl", "entropy", "clip_low", "clip_high")}
    totals = {"loss": update["loss"], "skipped_prompts": batch.skipped, "split_prompt_groups": batch.split_groups,
              "tokens": sum(len(p.ids) for p in batch.prompts) * G + sum(lengths),
              "groups": len(batch.prompts),
              "reward_std_in_group": groups.std(axis=1, ddof=1).sum() if groups is not None else 0.0,
              "packed_tokens": sum(packed_tokens),
              # Lockstep micro-batches cost as much as the largest one.
              "longest_microbatch_sum": max(packed_tokens, default=0) * len(packed_tokens),
              # Rows the sampler decoded (finished rows leave its batch every few tokens).
              "decode_slots": batch.decode_slots}
    total = reduce_over_ranks({**per_completion, **per_token, **totals}, world.device)
    S, N = update["sequences"], update["tokens"]
    return {
        "grad_norm": update["grad_norm"],
        **{k: total[k] / max(S, 1) for k in per_completion},
        "loss": total["loss"],
        **{k: total[k] / max(N, 1) for k in per_token},
        "reward_std_in_group": total["reward_std_in_group"] / total["groups"] if total["groups"] else 0.0,
        "skipped_prompts": total["skipped_prompts"], "split_prompt_groups": total["split_prompt_groups"],
        "sequences": S,
        "tokens_per_s": total["tokens"] / seconds,
        "pack_efficiency": total["packed_tokens"] / max(total["longest_microbatch_sum"], 1),
        "decode_efficiency": N / max(total["decode_slots"], 1),
        **reduce_over_ranks({"peak_memory_gb": peak_memory_gb(world.device)}, world.device, op="max"),
    }


# -------------------------------------------------------------------------------- stages


def train_sft(policy: Policy, cfg: Config, world, examples, run_log: MetricsLog, saver: Checkpointer,
              resume: ResumePoint | None) -> None:
    """Supervised warm-up: cross-entropy on the assistant tokens of structured solutions.
    resume: an SFT-stage checkpoint to continue from (its weights are already loaded)."""
    encoder = prompt_encoder(policy, cfg)
    if cfg.sft_data:
        sft_examples, encode = load_sft(cfg.sft_data, cfg.image_root or None).items, encoder.sft
    else:  # the RL data's own reference solutions
        sft_examples, encode = examples, encoder.solution
    engine = make_engine(policy.model, cfg, cfg.sft_lr, cfg.sft_steps, world)
    filler = filler_microbatch(policy, encoder, world.device)
    start = 0
    if resume is not None:
        engine.load_state(resume.path)
        load_rng(resume.path, world.rank)
        start = resume.step
    stream = batches(sft_examples, cfg.sft_batch_size, world, cfg.seed + 1, skip=start)
    engine.train()
    for step in range(start + 1, cfg.sft_steps + 1):
        t0 = time.perf_counter()
        samples = []
        for prompt, target in map(encode, next(stream)):
            if prompt.ids.numel() + target.numel() <= cfg.micro_batch_tokens:
                samples.append(Sample(prompt.ids, target, prompt.pixel_values, prompt.image_grid_thw))
        n_tokens = distributed.all_reduce_sum([sum(len(s.completion_ids) for s in samples)], world.device)[0]
        # Summed on the device and read back once per step: no host sync per micro-batch.
        loss_sum = torch.zeros((), device=world.device)
        micro, _ = packed_microbatches(samples, list(range(len(samples))), policy.model, cfg, world.device)
        for idx, packed in engine.lockstep(micro, filler):
            loss = engine.forward(sft_loss_sum, packed) / n_tokens * (0.0 if idx is None else 1.0)
            engine.backward(loss)
            loss_sum += loss.detach()
        loss_sum = float(loss_sum)
        grad_norm = engine.step(math.isfinite(loss_sum))
        record = {"stage": "sft", "step": step, "loss": distributed.all_reduce_sum([loss_sum], world.device)[0],
                  "grad_norm": grad_norm, "lr": engine.lr, "tokens": n_tokens,
                  "tokens_per_s": n_tokens / (time.perf_counter() - t0) / world.world_size}
        run_log.log(record)
        if step % cfg.log_every == 0 or step == cfg.sft_steps:
            distributed.print0(console_line(record))
        if saver.due(step, cfg.sft_steps):
            saver.save(policy, engine, "sft", step, {})
    engine.eval()
    engine.close()


def build_reference(policy: Policy, engine, cfg: Config, world, saver: Checkpointer, resume: ResumePoint | None,
                    source: str | None):
    """The KL reference (None when beta = 0): the policy as it starts GRPO, frozen; a resumed
    run loads it from where the checkpoint says. Returns (reference, its directory): `source`
    unless the weights had to be written first (RUN_DIR/reference, when checkpoints are on),
    the directory a resumed run will load."""
    if cfg.beta == 0:
        return None, source
    if resume is not None:
        model = load_policy(resume.reference, next(policy.model.parameters()).dtype, world.device,
                            cfg.min_pixels, cfg.max_pixels).model
        use_varlen_attention(model, None if cfg.attention == "auto" else cfg.attention)
        return engine.reference(model), resume.reference
    reference = engine.reference()
    if source is None and saver.save_every > 0:
        source = save_reference(policy, saver.run_dir, world)
    return reference, source


def save_reference(policy: Policy, run_dir: Path, world) -> str:
    """The policy as GRPO starts, in RUN_DIR/reference (written to a temporary name, then
    renamed): the KL reference a resumed run loads. Returns its path. Every rank calls it."""
    final = run_dir / "reference"
    save_full_policy(policy, final, world)
    return str(final.resolve())


def train_grpo(policy: Policy, cfg: Config, world, examples, eval_examples, run_log: MetricsLog,
               saver: Checkpointer, reference_source: str | None, resume: ResumePoint | None) -> dict:
    """StepGRPO. Returns the evaluation before and after (empty without eval_prompts).

    reference_source: a directory holding the weights the policy starts GRPO with (the KL
    reference), recorded in checkpoints so that a resumed run can load it; None = write them
    to RUN_DIR/reference first if checkpoints are on. resume: a GRPO-stage checkpoint to
    continue from (its weights are already loaded)."""
    impl = kernel_impl(cfg.kernel_impl, world.device)
    reward_cfg = RewardConfig(alpha=cfg.reward_alpha, normalize=cfg.reward_normalize, symbolic=cfg.reward_symbolic)
    eos_ids, encoder = eos_token_ids(policy), prompt_encoder(policy, cfg)
    engine = make_engine(policy.model, cfg, cfg.lr, cfg.num_steps * cfg.num_iterations, world)
    filler = filler_microbatch(policy, encoder, world.device)
    reference, reference_source = build_reference(policy, engine, cfg, world, saver, resume, reference_source)

    def held_out(when: str, result: dict | None = None) -> dict:
        if result is None:
            with engine.gathered():
                result = evaluate(policy, encoder, eval_examples, cfg, world, eos_ids, reward_cfg, cfg.seed + 7)
        if result:
            distributed.print0(f"{when} GRPO: ".ljust(13) + json.dumps({k: round(v, 4) for k, v in result.items()}))
        return result

    before = resume.before if resume is not None else held_out("before")
    generator = torch.Generator(world.device).manual_seed(cfg.seed * 1000 + world.rank)
    start = 0
    if resume is not None:
        engine.load_state(resume.path)
        load_rng(resume.path, world.rank, {"rollout": generator})
        start = resume.step
    stream = batches(examples, cfg.prompts_per_step, world, cfg.seed, skip=start)
    timer = Timer(world.device)
    progress = _progress(cfg, world, cfg.num_steps, "StepGRPO", initial=start)
    warn_undecided = UndecidedWarning()
    curve = {}  # step -> held-out evaluation, every --eval_every steps
    for step in range(start + 1, cfg.num_steps + 1):
        t0 = time.perf_counter()
        with timer("rollout"), engine.gathered():  # 1-2. sample, score, pack
            batch = rollout(policy, encoder, next(stream), cfg, world, generator, eos_ids, reward_cfg)
        update = grpo_update(engine, reference, batch, filler, cfg, impl, world, timer)  # 3. log-probs, update
        seconds = time.perf_counter() - t0
        record = {"stage": "grpo", "step": step, "rewards": cfg.rewards, "lr": engine.lr,  # 4. metrics, checkpoint
                  **grpo_metrics(batch, update, cfg.num_generations, seconds, world),
                  "skipped_updates": engine.skipped, **timer.pop(), "time_step": seconds}
        if cfg.eval_every and eval_examples and (step % cfg.eval_every == 0 or step == cfg.num_steps):
            with timer("eval"), engine.gathered():  # a learning curve; not counted in time_step
                curve[step] = evaluate(policy, encoder, eval_examples, cfg, world, eos_ids, reward_cfg, cfg.seed + 7)
            record.update({f"eval_{k}": v for k, v in curve[step].items()}, **timer.pop())
        run_log.log(record)
        if world.is_main:
            warn_undecided(record["undecided"], step)
        progress.update(1)
        progress.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['accuracy']:.2f}")
        if world.is_main and (step % cfg.log_every == 0 or step == cfg.num_steps):
            progress.write(console_line(record), file=sys.stdout)
        if saver.due(step, cfg.num_steps):
            saver.save(policy, engine, "grpo", step, {"before": before, "reference": reference_source},
                       {"rollout": generator})
    progress.close()

    # The curve's point at the last step is the final evaluation (the same seed, the same policy).
    results = {"before": before, "after": held_out("after", curve.get(cfg.num_steps))}
    engine.close()
    if reference is not None:
        reference.close()
    return results


def _progress(cfg: Config, world, total: int, desc: str, initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not (cfg.progress and world.is_main),
                file=sys.stdout, dynamic_ncols=True, leave=True)


# -------------------------------------------------------------------------------- the run


def setup_run_dir(cfg: Config, world) -> Path:
    name = cfg.run_dir or time.strftime("runs/%Y%m%d-%H%M%S")
    name = distributed.broadcast_object(name)  # ranks may start in different seconds
    run_dir = Path(name)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    distributed.barrier()
    return run_dir


# The built-in task's training records: about as many as the warm-up's 300 x 16 examples, so
# that it learns to read the pictures rather than recall the answers of a few hundred (with 512
# records, ten passes, seeds 0 and 1 of the same settings gained -0.20 and +0.47 in held-out reward).
SYNTHETIC_TRAINING_RECORDS = 4096


def prepare_tiny(cfg: Config, run_dir: Path, world) -> tuple[str, str]:
    """The built-in demo's data and model: the synthetic task and a tiny checkpoint written by
    rank 0 into the run directory, then loaded by every rank like any other."""
    from r1vl.synthetic import write_dataset
    from r1vl.tiny import write_tiny_checkpoint

    data = cfg.data or str(run_dir / "synthetic" / "data.jsonl")
    model_dir = run_dir / "tiny-init"
    written = Path(data).is_file() and (model_dir / "model.safetensors").is_file()
    if world.is_main and not written:  # a resumed run finds them in place
        if not cfg.data:
            write_dataset(run_dir / "synthetic", n=SYNTHETIC_TRAINING_RECORDS + cfg.eval_prompts, seed=cfg.seed)
        corpus = load_examples(data, cfg.image_root or None).items
        texts = [e.problem for e in corpus] + [e.solution for e in corpus]
        write_tiny_checkpoint(model_dir, texts, seed=cfg.seed, max_pixels=cfg.max_pixels, min_pixels=cfg.min_pixels)
    distributed.barrier()
    return data, str(model_dir)


def check_inputs(cfg: Config) -> None:
    """What can be checked before any process group or model exists."""
    if cfg.model != "tiny":
        check_checkpoint_dir(cfg.model)
    if cfg.resume and cfg.resume != "auto":
        find_resume_point(cfg.resume, Path(cfg.run_dir))
    for option in ("data", "sft_data"):
        path = getattr(cfg, option)
        if path and not Path(path).is_file():
            raise ValueError(f"--{option} {path}: no such file")


def main(argv=None) -> dict:
    """Parse and check the options (a bad one exits with status 2 and a message), then train."""
    try:
        cfg = parse_config(argv)
        if not cfg.plan:
            check_inputs(cfg)
        # Before any weight is loaded: a plan that does not fit stops here, naming the fixes.
        cfg, plan = check_plan(cfg, cfg.plan_gpus or int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if cfg.plan:
        print(plan.format())
        return {"plan": plan}
    world = distributed.init(cfg.device, always_group=bool(cfg.deepspeed))
    try:
        results = run(cfg, world)
    except BaseException:
        distributed.destroy(wait_for_others=False)
        raise
    distributed.destroy()
    return results


def quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched at run time
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


RESUME_INVARIANTS = {  # option -> why a resumed run must keep it
    "freeze_vision_tower": "the saved optimizer state covers exactly the parameters that were trained",
}


def resume_invariants(cfg: Config) -> dict:
    return {option: getattr(cfg, option) for option in RESUME_INVARIANTS}


def resume_point(cfg: Config, run_dir: Path, world) -> ResumePoint | None:
    """The checkpoint to continue from, if any, checked against this run's ranks."""
    resume = open_resume_point(cfg.resume, run_dir)
    if resume is not None and resume.world_size != world.world_size:
        raise SystemExit(f"error: {resume.path} was written by {resume.world_size} rank(s), this run has "
                         f"{world.world_size}: the data order and every rank's random state depend on it")
    if resume is not None:
        for option, value in resume_invariants(cfg).items():
            if option in resume.invariants and resume.invariants[option] != value:
                raise SystemExit(f"error: {resume.path} was written with --{option} {resume.invariants[option]}, "
                                 f"this run has {value}: {RESUME_INVARIANTS[option]}")
    if resume is not None:
        distributed.print0(f"resuming from {resume.path} ({resume.stage} step {resume.step})")
    elif cfg.resume == "auto":
        distributed.print0(f"--resume auto: no checkpoint in {run_dir / 'checkpoints'} yet; starting afresh")
    return resume


def start_policy(cfg: Config, model_path: str, world) -> Policy:
    """The policy every rank starts from (rank 0's weights), with the packed attention."""
    dtype = {"auto": torch.bfloat16 if world.device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float32": torch.float32}[cfg.dtype]
    policy = load_policy(model_path, dtype, world.device, cfg.min_pixels, cfg.max_pixels)
    use_varlen_attention(policy.model, None if cfg.attention == "auto" else cfg.attention)
    distributed.broadcast_parameters(policy.model)
    if cfg.freeze_vision_tower:  # before any engine exists: engines optimize what requires grad
        vision_tower(policy.model).requires_grad_(False)
    if cfg.activation_checkpointing == "on":  # "auto" was resolved by the memory plan
        enable_activation_checkpointing(policy.model)
    return policy


def split_data(data: str, cfg: Config) -> tuple[list, list]:
    """(training examples, the last eval_prompts examples held out for evaluation)."""
    examples = load_examples(data, cfg.image_root or None).items if data else []
    held_out = examples[len(examples) - cfg.eval_prompts:] if cfg.eval_prompts else []
    return examples[:len(examples) - len(held_out)], held_out


def run_stages(cfg: Config, world, policy: Policy, model_path: str, run_dir: Path, resume: ResumePoint | None,
               data: str) -> dict:
    """The warm-up and/or StepGRPO, as --stage says; a resumed run skips what it finished."""
    examples, eval_examples = split_data(data, cfg)
    run_log = MetricsLog(run_dir, world.is_main, resumed_at=(resume.stage, resume.step) if resume else None)
    saver = Checkpointer(run_dir, cfg.save_every, cfg.keep_last, cfg.sft_steps if "sft" in cfg.stages else 0, world,
                         resume_invariants(cfg))
    results: dict = {}
    sft_done = resume is not None and resume.stage == "grpo"
    try:
        warmed_up = False
        if "sft" in cfg.stages and not sft_done:
            train_sft(policy, cfg, world, examples, run_log, saver, resume and resume.of_stage("sft"))
            warmed_up = True
        if "grpo" in cfg.stages:
            # The KL reference is the policy as GRPO starts: the --model directory itself,
            # unless a warm-up changed it or it came from a trainer checkpoint (which rotation
            # deletes); then it is written to RUN_DIR/reference.
            reference_source = None if warmed_up or resume is not None else str(Path(model_path).resolve())
            results = train_grpo(policy, cfg, world, examples, eval_examples, run_log, saver, reference_source,
                                 resume and resume.of_stage("grpo"))
    finally:
        run_log.close()
    return results


def finish(cfg: Config, world, policy: Policy, run_dir: Path, results: dict) -> dict:
    """The ranks' weight digests, the final policy, results.json, the curves, the summary line."""
    results["weight_digests"] = distributed.weight_digests(policy.model)
    if len(set(results["weight_digests"])) > 1:
        distributed.print0("WARNING: the ranks' weights differ: " + ", ".join(results["weight_digests"]))
    if cfg.save_final:
        save_full_policy(policy, run_dir / "final", world)
        distributed.print0(f"final policy saved to {run_dir / 'final'}")
    if world.is_main:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if "grpo" in cfg.stages:
            print(f"curves: {plot_run(run_dir)}", flush=True)
        if results.get("before"):
            b, a = results["before"], results["after"]
            print(f"mean reward {b['reward']:.3f} -> {a['reward']:.3f}   accuracy {b['accuracy']:.3f} -> "
                  f"{a['accuracy']:.3f}   (held-out prompts, before -> after StepGRPO)", flush=True)
    return results


def run(cfg: Config, world: distributed.Dist) -> dict:
    quiet_transformers()
    torch.manual_seed(cfg.seed)
    run_dir = setup_run_dir(cfg, world)
    resume = resume_point(cfg, run_dir, world)
    data, model_path = prepare_tiny(cfg, run_dir, world) if cfg.model == "tiny" else (cfg.data, cfg.model)
    if resume is not None:
        model_path = str(resume.path / "policy")
    policy = start_policy(cfg, model_path, world)
    distributed.print0(f"r1vl: {cfg.stage} on {world.world_size} rank(s), {world.device}, {policy.model.dtype}; "
                       f"run dir {run_dir}")
    results = run_stages(cfg, world, policy, model_path, run_dir, resume, data)
    return finish(cfg, world, policy, run_dir, {"run_dir": str(run_dir), **results})


if __name__ == "__main__":
    main()
