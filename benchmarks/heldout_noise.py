"""How much does the held-out yardstick move for one policy? Sampling noise of train.py's evaluation:

    python benchmarks/heldout_noise.py RUN_DIR                        # RUN_DIR/final; 128x2 and 1024x1
    python benchmarks/heldout_noise.py RUN_DIR --policy RUN_DIR/reference --sizes 256x4 --seeds 0 1 2 3 4 5

Scores one saved policy with train.py's own evaluation, r1vl.heldout (the run's config.json: temperature,
lengths, reward) on the last PROMPTS of the run's held-out records, SAMPLES completions
each, once per sampling seed, and prints per size each seed's mean reward and accuracy and
their spread. A gain between two evaluations is the policy's only where it is large next to
this spread; the built-in run's 1024 x 1 was chosen with it (1024 x 1 read a final
policy's accuracy within sd 0.012 over four seeds, 128 x 2 within sd 0.033).

Runs on the CPU, one process; a size asks for at most the run's --eval_prompts prompts.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from r1vl import distributed  # noqa: E402
from r1vl.config import Config, EvalOptions  # noqa: E402
from r1vl.heldout import HeldOut  # noqa: E402
from r1vl.model.policy import load_trainable  # noqa: E402
from r1vl.rewards.scorer import Scorer  # noqa: E402
from r1vl.run.setup import quiet_transformers, split_data  # noqa: E402
from r1vl.sampling.sampler import Sampler, prompt_encoder  # noqa: E402


def parse_size(text: str) -> tuple[int, int]:
    """'PROMPTSxSAMPLES' -> (prompts, samples), both >= 1."""
    try:
        prompts, samples = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a size is PROMPTSxSAMPLES, e.g. 128x2; got {text!r}") from None
    if prompts < 1 or samples < 1:
        raise ValueError(f"a size needs at least one prompt and one sample, got {text!r}")
    return prompts, samples


def measure(run_dir: Path, policy_dir: Path, sizes: list[tuple[int, int]], seeds: list[int]) -> dict:
    """{(prompts, samples): [{"seed", "reward", "accuracy", "step_rvr"}, ...]} for one policy."""
    cfg = Config.from_flat(json.loads((run_dir / "config.json").read_text()))
    data = Path(cfg.dataset.data) if cfg.dataset.data else run_dir / "synthetic" / "data.jsonl"
    _, held_out = split_data(str(data), cfg.dataset, cfg.evaluation.eval_prompts)
    for prompts, _ in sizes:
        if prompts > len(held_out):
            raise ValueError(f"{prompts} prompts asked, but {run_dir} holds out {len(held_out)} (--eval_prompts)")
    quiet_transformers()
    world = distributed.init("cpu")
    policy = load_trainable(str(policy_dir), cfg.policy, cfg.dataset, world)
    # Each evaluation draws from its own seed.
    sampler = Sampler(policy, cfg.sampling, prompt_encoder(policy, cfg.dataset), torch.Generator())
    scorer = Scorer(cfg.reward, cfg.sampling.num_generations, world)
    results = {}
    for prompts, samples in sizes:
        held = HeldOut(sampler, scorer, held_out[-prompts:], EvalOptions(eval_generations=samples), world,
                       batch_size=cfg.sampling.batch_size, seed=cfg.run.seed)
        results[(prompts, samples)] = [{"seed": seed, **held(seed)} for seed in seeds]
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished train.py run (its config.json and held-out records)")
    parser.add_argument("--policy", type=Path, help="the policy to score (default: RUN_DIR/final)")
    parser.add_argument("--sizes", nargs="+", default=["128x2", "1024x1"], help="PROMPTSxSAMPLES yardsticks")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="sampling seeds")
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("--seeds: two or more, to measure a spread")
    try:
        sizes = [parse_size(s) for s in args.sizes]
        results = measure(args.run_dir, args.policy or args.run_dir / "final", sizes, args.seeds)
    except ValueError as e:
        parser.error(str(e))
    print("| held-out size | metric | per seed | mean | std |")
    print("| --- | --- | --- | --- | --- |")
    for (prompts, samples), evaluations in results.items():
        for key in ("reward", "accuracy"):
            values = [e[key] for e in evaluations]
            per_seed = ", ".join(f"s{e['seed']} {e[key]:.3f}" for e in evaluations)
            print(f"| {prompts} x {samples} | {key} | {per_seed} | {statistics.mean(values):.3f} | "
                  f"{statistics.stdev(values):.3f} |")


if __name__ == "__main__":
    main()
