"""StepGRPO (R1-VL, arXiv 2503.12937): online RL for Qwen2-VL with step-wise rewards.

    python train.py                                   # built-in demo: tiny Qwen2-VL, synthetic task, CPU
    python train.py --model PATH --data train.jsonl   # a local Qwen2-VL / Qwen2.5-VL checkpoint
    torchrun --nproc_per_node=4 train.py --model PATH --data train.jsonl
    python train.py --stage sft --model PATH --data train.jsonl   # the supervised warm-up only
    python train.py --run_dir runs/a --resume auto    # continue a killed run from its newest checkpoint
    python train.py --help                            # every option, with the paper's defaults
    torchrun --nproc_per_node=8 train.py --deepspeed configs/zero3.json --model PATH --data train.jsonl

One GRPO step, per data-parallel rank:
  1. rollout: prompts_per_step prompts, G completions each (r1vl.rollout: the image and the
     prompt prefill once per prompt, KV cache expanded to G, batched decode). Prompts longer
     than max_prompt_length are skipped and counted, never cut.
  2. rewards: StepRAR + StepRVR (r1vl.rewards), one example per completion; advantages
     normalized within each group of G.
  3. old log-probs (only if num_iterations > 1) and reference log-probs (if beta > 0, from
     a frozen copy of the initial policy, which sees the image too): packed forwards.
  4. num_iterations optimizer steps, each over all packed micro-batches with the fused loss;
     each micro-batch's loss is weighted by its share of the global batch and gradients are
     summed over ranks, so the step's gradient is that of the whole batch.
  5. metrics to the console and RUN_DIR/metrics.jsonl; every save_every steps a checkpoint
     (r1vl.resume) that --resume auto continues from exactly.
The warm-up stage (--stage sft or sft+grpo) trains on the reference solutions first
(cross-entropy on the assistant tokens only), as the paper does.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from r1vl import distributed
from r1vl.attention import use_varlen_attention
from r1vl.checkpoint import Policy, check_checkpoint_dir, load_policy, save_policy
from r1vl.config import Config, parse_config, to_dict
from r1vl.data import load_examples, load_sft
from r1vl.engine import PlainEngine
from r1vl.losses import (completion_logprobs, kernel_impl, microbatch_weight, policy_loss, sft_loss_sum,
                         step_advantages)
from r1vl.metrics import MetricsLog, Timer, console_line, peak_memory_gb
from r1vl.packing import Sample, pack, plan_microbatches
from r1vl.plot import plot_run
from r1vl.prompts import blank_prompt, encode_prompt, encode_sft, encode_solution
from r1vl.reward_sets import trained_reward
from r1vl.resume import Checkpointer, find_resume_point, load_rng, read_trainer_state
from r1vl.rewards import RewardConfig, score_groups
from r1vl.rollout import generate

# -------------------------------------------------------------------------------- helpers


def batches(items: list, per_rank: int, dd: distributed.Dist, seed: int, skip: int = 0):
    """Endless per-rank batches: each epoch a seeded permutation of `items`, cut into global
    batches of per_rank * world_size; rank r takes its own slice, so ranks see different items.
    The first `skip` batches are passed over (a resumed run's data position)."""
    if len(items) < per_rank * dd.world_size:
        raise ValueError(f"{len(items)} examples cannot fill one global batch of {per_rank} x {dd.world_size} ranks")
    generator, step = torch.Generator().manual_seed(seed), per_rank * dd.world_size
    while True:
        order = torch.randperm(len(items), generator=generator).tolist()
        for start in range(0, len(order) - step + 1, step):
            if skip > 0:
                skip -= 1
                continue
            mine = order[start + dd.rank * per_rank: start + (dd.rank + 1) * per_rank]
            yield [items[i] for i in mine]


def packed_microbatches(samples: list[Sample], groups: list[int], model, cfg: Config, device) -> list:
    """The rank's sequences as packed micro-batches of at most micro_batch_tokens tokens; the
    G siblings of a prompt stay together where they fit, so their image is encoded once."""
    lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in samples]
    plan = plan_microbatches(lengths, cfg.micro_batch_tokens, world_size=1, groups=groups)[0]
    return [(idx, pack([samples[i] for i in idx], model).to(device)) for idx in plan if idx]


def filler_microbatch(policy: Policy, cfg: Config, device):
    """A packed batch of one blank-image sequence: what a rank with fewer micro-batches runs,
    weighted 0, when the engine keeps ranks in lockstep (engine.lockstep)."""
    merge = policy.model.config.vision_config.spatial_merge_size
    prompt = blank_prompt(policy.tokenizer, policy.image_processor, merge, cfg.min_pixels)
    return pack([Sample(prompt.ids, prompt.ids[-1:], prompt.pixel_values, prompt.image_grid_thw)],
                policy.model).to(device)


def make_engine(model, cfg: Config, lr: float, total_steps: int, dd: distributed.Dist):
    """The engine (r1vl.engine) that turns this stage's losses into updates: DeepSpeed's with
    --deepspeed (imported only then), else plain data parallelism."""
    if cfg.deepspeed:
        from r1vl.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, lr, total_steps, dd)
    return PlainEngine(model, cfg, lr, total_steps, dd)


# -------------------------------------------------------------------------------- rollout


def rollout(policy: Policy, examples, cfg: Config, dd: distributed.Dist, generator, eos_ids, reward_cfg):
    """Encode, sample G completions per prompt, score. Returns (prompts, completions, rewards
    breakdown, skipped count); completions are prompt-major (p*G + g)."""
    merge = policy.model.config.vision_config.spatial_merge_size
    prompts, skipped = [], 0
    for example in examples:
        prompt = encode_prompt(example, policy.tokenizer, policy.image_processor, merge, cfg.max_pixels, cfg.min_pixels)
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
    return prompts, completions, rewards, skipped


def evaluate(policy: Policy, examples, cfg: Config, dd, eos_ids, reward_cfg, seed: int) -> dict:
    """Mean reward and accuracy of eval_generations (0: G) sampled completions on the held-out
    prompts (split over ranks), batch_size completions at a time. The full reward (StepRAR +
    StepRVR), whatever --rewards trains on. The same seed each time: successive evaluations
    draw the same random numbers, so their differences are the policy's, less sampling noise."""
    if not examples:
        return {}
    generator = torch.Generator(dd.device).manual_seed(seed + dd.rank)
    sums = [0.0, 0.0, 0.0, 0.0]
    mine = examples[dd.rank::dd.world_size]
    G = cfg.eval_generations or cfg.num_generations
    cfg = dataclasses.replace(cfg, num_generations=G)
    per_chunk = max(cfg.batch_size // G, 1)
    for start in range(0, len(mine), per_chunk):
        _, _, r, _ = rollout(policy, mine[start:start + per_chunk], cfg, dd, generator, eos_ids, reward_cfg)
        sums = [a + b for a, b in zip(sums, [r.total.sum(), r.accuracy.sum(), r.step_rvr.sum(), len(r)])]
    total, accuracy, rvr, n = distributed.all_reduce_sum(sums, dd.device)
    return {"reward": total / max(n, 1), "accuracy": accuracy / max(n, 1), "step_rvr": rvr / max(n, 1)}


# -------------------------------------------------------------------------------- stages


def train_sft(policy: Policy, cfg: Config, dd, examples, run_log: MetricsLog, saver: Checkpointer,
              resume: Path | None = None) -> None:
    """Supervised warm-up: cross-entropy on the assistant tokens of structured solutions.
    resume: an SFT-stage checkpoint to continue from (its weights are already loaded)."""
    model = policy.model
    merge = model.config.vision_config.spatial_merge_size
    if cfg.sft_data:
        loaded = load_sft(cfg.sft_data, cfg.image_root or None).items
        encode = lambda ex: encode_sft(ex, policy.tokenizer, policy.image_processor, merge, cfg.max_pixels, cfg.min_pixels)  # noqa: E731
    else:  # the RL data's own reference solutions
        loaded = examples
        def encode(ex):
            prompt = encode_prompt(ex, policy.tokenizer, policy.image_processor, merge, cfg.max_pixels, cfg.min_pixels)
            return prompt, encode_solution(ex.solution, policy.tokenizer)
    engine = make_engine(model, cfg, cfg.sft_lr, cfg.sft_steps, dd)
    filler = filler_microbatch(policy, cfg, dd.device)
    start = 0
    if resume is not None:
        engine.load_state(resume)
        load_rng(resume, dd.rank)
        start = read_trainer_state(resume)["step"]
    stream = batches(loaded, cfg.sft_batch_size, dd, cfg.seed + 1, skip=start)
    engine.train()
    for step in range(start + 1, cfg.sft_steps + 1):
        t0 = time.perf_counter()
        samples = []
        for prompt, target in map(encode, next(stream)):
            if prompt.ids.numel() + target.numel() <= cfg.micro_batch_tokens:
                samples.append(Sample(prompt.ids, target, prompt.pixel_values, prompt.image_grid_thw))
        n_tokens = distributed.all_reduce_sum([sum(len(s.completion_ids) for s in samples)], dd.device)[0]
        # Summed on the device and read back once per step: no host sync per micro-batch.
        loss_sum = torch.zeros((), device=dd.device)
        micro = packed_microbatches(samples, list(range(len(samples))), model, cfg, dd.device)
        for idx, packed in engine.lockstep(micro, filler):
            loss = engine.forward(sft_loss_sum, packed) / n_tokens * (0.0 if idx is None else 1.0)
            engine.backward(loss)
            loss_sum += loss.detach()
        loss_sum = float(loss_sum)
        grad_norm = engine.step(math.isfinite(loss_sum))
        record = {"stage": "sft", "step": step, "loss": distributed.all_reduce_sum([loss_sum], dd.device)[0],
                  "grad_norm": grad_norm, "lr": engine.lr, "tokens": n_tokens,
                  "tokens_per_s": n_tokens / (time.perf_counter() - t0) / dd.world_size}
        run_log.log(record)
        if step % cfg.log_every == 0 or step == cfg.sft_steps:
            distributed.print0(console_line(record))
        if saver.due(step, cfg.sft_steps):
            saver.save(policy, engine, "sft", step, {})
    engine.eval()
    engine.close()


def train_grpo(policy: Policy, cfg: Config, dd, examples, eval_examples, run_log: MetricsLog, saver: Checkpointer,
               reference_source: str | None, resume: Path | None = None) -> dict:
    """StepGRPO. Returns the evaluation before and after (empty without eval_prompts).

    reference_source: a checkpoint directory holding the weights the policy starts GRPO
    with (the KL reference), recorded in checkpoints so that a resumed run can load it; None
    = write them to RUN_DIR/reference first if checkpoints are on. resume: a GRPO-stage
    checkpoint to continue from (its weights are already loaded)."""
    model = policy.model
    impl = kernel_impl(cfg.kernel_impl, dd.device)
    reward_cfg = RewardConfig(alpha=cfg.reward_alpha, normalize=cfg.reward_normalize, symbolic=cfg.reward_symbolic)
    eos_ids = sorted({policy.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")})
    G = cfg.num_generations
    state = read_trainer_state(resume) if resume is not None else {"step": 0}
    engine = make_engine(model, cfg, cfg.lr, cfg.num_steps * cfg.num_iterations, dd)
    filler = filler_microbatch(policy, cfg, dd.device)
    reference = None
    if cfg.beta > 0:  # the policy as it starts GRPO (after any warm-up), frozen (engine.reference)
        if resume is not None:
            reference_source = state["reference"]
            loaded = load_policy(reference_source, next(model.parameters()).dtype, dd.device,
                                 cfg.min_pixels, cfg.max_pixels).model
            use_varlen_attention(loaded, None if cfg.attention == "auto" else cfg.attention)
            reference = engine.reference(loaded)
        else:
            reference = engine.reference()
            if reference_source is None and saver.save_every > 0:
                reference_source = save_reference(policy, saver.run_dir, dd)

    if resume is not None:
        results = {"before": state["before"]}
    else:
        with engine.gathered():
            results = {"before": evaluate(policy, eval_examples, cfg, dd, eos_ids, reward_cfg, cfg.seed + 7)}
        if results["before"]:
            distributed.print0("before GRPO: " + json.dumps({k: round(v, 4) for k, v in results["before"].items()}))

    generator = torch.Generator(dd.device).manual_seed(cfg.seed * 1000 + dd.rank)
    if resume is not None:
        engine.load_state(resume)
        load_rng(resume, dd.rank, {"rollout": generator})
    start = state["step"]
    stream = batches(examples, cfg.prompts_per_step, dd, cfg.seed, skip=start)
    timer = Timer(dd.device)
    loss_options = dict(temperature=cfg.temperature, beta=cfg.beta, epsilon_low=cfg.epsilon_low,
                        epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                        max_completion_length=cfg.max_completion_length, softmax=cfg.loss_softmax)
    progress = _progress(cfg, dd, cfg.num_steps, "StepGRPO", initial=start)
    last_eval = (None, {})  # (step, evaluation) of the latest eval-every-K evaluation
    for step in range(start + 1, cfg.num_steps + 1):
        t0 = time.perf_counter()
        # 1-2. rollout and rewards
        with timer("rollout"), engine.gathered():
            prompts, completions, rewards, too_long = rollout(
                policy, next(stream), cfg, dd, generator, eos_ids, reward_cfg)
            samples = [Sample(p.ids, ids, p.pixel_values, p.image_grid_thw)
                       for p, ids in zip([p for p in prompts for _ in range(G)], completions.ids)]
            reward_t = torch.as_tensor(trained_reward(rewards, cfg.rewards), dtype=torch.float32)
            advantages = step_advantages(reward_t, G, cfg.scale_rewards,
                                         lambda values: distributed.all_reduce_sum(values, dd.device))
            micro = packed_microbatches(samples, [i // G for i in range(len(samples))], model, cfg, dd.device)
        S_local, N_local = len(samples), sum(len(ids) for ids in completions.ids)
        S_global, N_global = distributed.all_reduce_sum([S_local, N_local], dd.device)
        steps = engine.lockstep(micro, filler)  # micro, plus zero-weighted fillers where ranks must keep pace

        # 3. old and reference log-probs, once per rollout
        with timer("reference"):
            old = [engine.forward(completion_logprobs, pb, cfg.temperature, impl) if cfg.num_iterations > 1
                   else None for _, pb in steps]
            ref = [reference.forward(completion_logprobs, pb, cfg.temperature, impl) if reference is not None
                   else None for _, pb in steps]

        # 4. num_iterations optimizer steps over the packed micro-batches
        # Token-weighted sums (divided by the global token count below), kept on the device
        # and read back once per optimizer step: no host sync per micro-batch.
        stats = {k: torch.zeros((), device=dd.device) for k in ("loss", "kl", "entropy", "clip_low", "clip_high")}
        with timer("update"):
            engine.train()
            for _ in range(cfg.num_iterations):
                iteration_loss = torch.zeros((), device=dd.device)
                for k, (idx, pb) in enumerate(steps):
                    n = pb.target_ids.numel()
                    if idx is None:  # a filler (engine.lockstep): runs like a micro-batch, weighted 0
                        adv, weight = torch.zeros(pb.num_sequences), 0.0
                    else:
                        adv, weight = advantages[idx], microbatch_weight(cfg.loss_type, len(idx), n, S_global,
                                                                         N_global)
                    out = engine.forward(policy_loss, pb, adv.to(dd.device), old[k], ref[k], impl=impl,
                                         num_items_in_batch=N_global, **loss_options)
                    loss = out.loss * weight
                    engine.backward(loss)
                    if idx is None:
                        continue
                    iteration_loss += loss.detach()
                    if out.kl is not None:
                        stats["kl"] += out.kl.sum() / cfg.num_iterations
                    stats["entropy"] += out.entropy.sum() / cfg.num_iterations
                    stats["clip_low"] += out.clip_low_frac * n / cfg.num_iterations
                    stats["clip_high"] += out.clip_high_frac * n / cfg.num_iterations
                stats["loss"] += iteration_loss / cfg.num_iterations
                grad_norm = engine.step(math.isfinite(float(iteration_loss)))
            engine.eval()
        stats = {k: float(v) for k, v in stats.items()}

        # 5. metrics, reduced over ranks
        seconds = time.perf_counter() - t0
        r = rewards
        prompt_tokens = sum(len(p.ids) for p in prompts) * G
        packed_tokens = [pb.num_tokens for _, pb in micro]
        keys = ["reward", "accuracy", "step_rar", "step_rvr", "key_step_match", "has_answer", "truncated",
                "completion_len", "loss", "kl", "entropy", "clip_low", "clip_high", "skipped_prompts",
                "tokens", "microbatches", "packed_tokens", "longest_microbatch_sum", "decode_slots"]
        local = [r.total.sum(), r.accuracy.sum(), r.step_rar.sum(), r.step_rvr.sum(), r.key_step_match.sum(),
                 r.has_answer.sum(), float((~completions.stopped).sum()), N_local, stats["loss"], stats["kl"],
                 stats["entropy"], stats["clip_low"], stats["clip_high"], too_long, prompt_tokens + N_local,
                 len(micro), sum(packed_tokens), max(packed_tokens, default=0) * len(micro),
                 S_local * max((len(ids) for ids in completions.ids), default=0)]
        total = dict(zip(keys, distributed.all_reduce_sum(local, dd.device)))
        per_seq = 1.0 / max(S_global, 1)
        per_token = 1.0 / max(N_global, 1)
        record = {
            "stage": "grpo", "step": step, "rewards": cfg.rewards, "lr": engine.lr, "grad_norm": grad_norm,
            **{k: total[k] * per_seq for k in ("reward", "accuracy", "step_rar", "step_rvr", "key_step_match",
                                                "has_answer", "truncated", "completion_len")},
            "loss": total["loss"],
            **{k: total[k] * per_token for k in ("kl", "entropy", "clip_low", "clip_high")},
            "reward_std_in_group": float(rewards.total.reshape(-1, G).std(axis=1, ddof=1).mean()) if samples else 0.0,
            "skipped_prompts": total["skipped_prompts"], "sequences": S_global,
            "tokens_per_s": total["tokens"] / seconds,
            # Lockstep micro-batches cost as much as the largest one: useful share of that.
            "pack_efficiency": total["packed_tokens"] / max(total["longest_microbatch_sum"], 1),
            # The sampler decodes every sequence until the longest stops: useful share of that.
            "decode_efficiency": N_global / max(total["decode_slots"], 1),
            "peak_memory_gb": distributed.all_reduce_max([peak_memory_gb(dd.device)], dd.device)[0],
            "skipped_updates": engine.skipped, **timer.pop(), "time_step": seconds,
        }
        if cfg.eval_every and eval_examples and (step % cfg.eval_every == 0 or step == cfg.num_steps):
            with timer("eval"), engine.gathered():  # a learning curve; not counted in time_step
                last_eval = (step, evaluate(policy, eval_examples, cfg, dd, eos_ids, reward_cfg, cfg.seed + 7))
            record.update({f"eval_{k}": v for k, v in last_eval[1].items()}, **timer.pop())
        run_log.log(record)
        progress.update(1)
        progress.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['accuracy']:.2f}")
        if dd.is_main and (step % cfg.log_every == 0 or step == cfg.num_steps):
            progress.write(console_line(record), file=sys.stdout)
        if saver.due(step, cfg.num_steps):
            saver.save(policy, engine, "grpo", step, {"before": results["before"], "reference": reference_source},
                       {"rollout": generator})
    progress.close()

    if last_eval[0] == cfg.num_steps:  # the eval-every-K curve's last point is the final evaluation
        results["after"] = last_eval[1]
    else:
        with engine.gathered():
            results["after"] = evaluate(policy, eval_examples, cfg, dd, eos_ids, reward_cfg, cfg.seed + 7)
    if results["after"]:
        distributed.print0("after GRPO:  " + json.dumps({k: round(v, 4) for k, v in results["after"].items()}))
    engine.close()
    if reference is not None:
        reference.close()
    return results


def _progress(cfg: Config, dd, total: int, desc: str, initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not (cfg.progress and dd.is_main),
                file=sys.stdout, dynamic_ncols=True, leave=True)


def save_reference(policy: Policy, run_dir: Path, dd) -> str:
    """The policy as GRPO starts, in RUN_DIR/reference (written to a temporary name, then
    renamed): the KL reference a resumed run loads. Returns its path. Every rank calls it."""
    final, tmp = run_dir / "reference", run_dir / ".tmp-reference"
    with distributed.gathered(policy.model):  # full weights if ZeRO-3 sharded them
        if dd.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            save_policy(policy, tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
    distributed.barrier()
    return str(final.resolve())


# -------------------------------------------------------------------------------- main


def setup_run_dir(cfg: Config, dd) -> Path:
    name = cfg.run_dir or time.strftime("runs/%Y%m%d-%H%M%S")
    name = distributed.broadcast_object(name)  # ranks may start in different seconds
    run_dir = Path(name)
    if dd.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    distributed.barrier()
    return run_dir


def prepare_tiny(cfg: Config, run_dir: Path, dd) -> tuple[str, str]:
    """The built-in demo's data and model: the synthetic task and a tiny checkpoint written by
    rank 0 into the run directory, then loaded by every rank like any other."""
    from r1vl.synthetic import write_dataset
    from r1vl.tiny import write_tiny_checkpoint

    data = cfg.data or str(run_dir / "synthetic" / "data.jsonl")
    model_dir = run_dir / "tiny-init"
    written = Path(data).is_file() and (model_dir / "model.safetensors").is_file()
    if dd.is_main and not written:  # a resumed run finds them in place
        if not cfg.data:
            write_dataset(run_dir / "synthetic", n=512, seed=cfg.seed)
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
        check_inputs(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    dd = distributed.init(cfg.device, always_group=bool(cfg.deepspeed))
    try:
        results = run(cfg, dd)
    except BaseException:
        distributed.destroy(wait_for_others=False)
        raise
    distributed.destroy()
    return results


def run(cfg: Config, dd: distributed.Dist) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched at run time
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(cfg.seed)
    run_dir = setup_run_dir(cfg, dd)
    resume = find_resume_point(cfg.resume, run_dir)
    state = read_trainer_state(resume) if resume is not None else None
    if state is not None and state["world_size"] != dd.world_size:
        raise SystemExit(f"error: {resume} was written by {state['world_size']} rank(s), this run has "
                         f"{dd.world_size}: the data order and every rank's random state depend on it")
    data, model_path = (prepare_tiny(cfg, run_dir, dd) if cfg.model == "tiny" else (cfg.data, cfg.model))
    if resume is not None:
        model_path = str(resume / "policy")
        distributed.print0(f"resuming from {resume} ({state['stage']} step {state['step']})")
    elif cfg.resume == "auto":
        distributed.print0(f"--resume auto: no checkpoint in {run_dir / 'checkpoints'} yet; starting afresh")
    dtype = {"auto": torch.bfloat16 if dd.device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float32": torch.float32}[cfg.dtype]
    policy = load_policy(model_path, dtype, dd.device, cfg.min_pixels, cfg.max_pixels)
    use_varlen_attention(policy.model, None if cfg.attention == "auto" else cfg.attention)
    distributed.broadcast_parameters(policy.model)
    distributed.print0(f"r1vl: {cfg.stage} on {dd.world_size} rank(s), {dd.device}, {dtype}; run dir {run_dir}")

    examples = load_examples(data, cfg.image_root or None).items if data else []
    eval_examples = examples[len(examples) - cfg.eval_prompts:] if cfg.eval_prompts else []
    examples = examples[:len(examples) - len(eval_examples)]
    run_log = MetricsLog(run_dir, dd.is_main, resumed_at=(state["stage"], state["step"]) if state else None)
    saver = Checkpointer(run_dir, cfg.save_every, cfg.keep_last, cfg.sft_steps if "sft" in cfg.stage else 0, dd)
    resumed_stage = state["stage"] if state else None
    results: dict = {"run_dir": str(run_dir)}
    try:
        warmed_up = False
        if cfg.stage in ("sft", "sft+grpo") and resumed_stage != "grpo":
            train_sft(policy, cfg, dd, examples, run_log, saver, resume if resumed_stage == "sft" else None)
            warmed_up = True
        if cfg.stage in ("grpo", "sft+grpo"):
            # The KL reference is the policy as GRPO starts: the --model directory itself,
            # unless a warm-up changed it or it came from a trainer checkpoint (which rotation
            # deletes); then it is written to RUN_DIR/reference.
            reference_source = None if warmed_up or resume is not None else str(Path(model_path).resolve())
            results.update(train_grpo(policy, cfg, dd, examples, eval_examples, run_log, saver, reference_source,
                                      resume if resumed_stage == "grpo" else None))
    finally:
        run_log.close()
    results["weight_digests"] = distributed.weight_digests(policy.model)
    if len(set(results["weight_digests"])) > 1:
        distributed.print0("WARNING: the ranks' weights differ: " + ", ".join(results["weight_digests"]))
    if cfg.save_final:
        with distributed.gathered(policy.model):  # full weights if ZeRO-3 sharded them
            if dd.is_main:
                save_policy(policy, run_dir / "final")
        distributed.barrier()
        distributed.print0(f"final policy saved to {run_dir / 'final'}")
    if dd.is_main:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if "grpo" in cfg.stage:
            print(f"curves: {plot_run(run_dir)}", flush=True)
        if "before" in results and results["before"]:
            b, a = results["before"], results["after"]
            print(f"mean reward {b['reward']:.3f} -> {a['reward']:.3f}   accuracy {b['accuracy']:.3f} -> "
                  f"{a['accuracy']:.3f}   (held-out prompts, before -> after StepGRPO)", flush=True)
    return results


if __name__ == "__main__":
    main()
