"""Padding efficiency of the trainer's packed micro-batches vs padded ones, on GRPO-like lengths.

    python benchmarks/bench_packing.py --out benchmarks/results/packing_efficiency.md

No model runs: this counts rows (tokens the model computes). One step as train.py runs it:
each of WORLD_SIZE ranks holds its own PROMPTS / WORLD_SIZE prompts with their G completions
(train.batches), cuts them into micro-batches on its own, and the engine pads every rank's list
with filler micro-batches to the largest count over the ranks (engine.lockstep: ZeRO meets at
every layer of every forward and backward). The batchings:
  - padded (b per micro-batch): each micro-batch padded to its longest sequence, b * longest rows;
  - packed, share_prompts off: r1vl.update.microbatches.plan_microbatches with groups = prompts, as
    r1vl.update.microbatches.plan_batch calls it; a packed row computes exactly its sequences;
  - packed, share_prompts on (the default): r1vl.update.microbatches.plan_shared_microbatches; a row holds
    each prompt once per group (or per part of a group over the budget) and its completions.
Columns: "rows / sequence tokens" is every row the ranks compute (padding and fillers included)
over the tokens of the unshared sequences (prompt + completion each), the cost of the step;
"efficiency per rank" is useful rows over the rows each rank computes (fillers are not
useful); "efficiency lockstep" charges every micro-batch step at its largest micro-batch over
the ranks times WORLD_SIZE, what a step costs when the ranks wait for each other; "budget
fill" is useful rows over steps * WORLD_SIZE * max_tokens; "image encodings per sequence":
pack encodes each distinct image once per micro-batch.

Lengths of one step: 64 prompts of 300-800 tokens (text and image), G = 4 completions each,
completion lengths from two spreads: "uniform" 50-1024, and "capped" where 30% of the
completions run into the 1024-token cap and the rest are 50-600.
"""
import argparse
import platform
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from r1vl.update.microbatches import plan_microbatches, plan_shared_microbatches  # noqa: E402
from r1vl.update.packing import Sequence  # noqa: E402

PROMPTS, G, WORLD_SIZE, STEPS = 64, 4, 4, 20
# Rows of the filler micro-batch (train.filler_microbatch): Qwen2-VL's chat template around a
# blank 56 x 56 image (4 image tokens), about 30 tokens, plus a one-token completion.
FILLER_ROWS = 31


@dataclass
class Micro:
    """One micro-batch of one rank."""

    useful: int  # rows that are sequence tokens (padding and fillers are not)
    rows: int  # rows computed
    encodings: int  # images the vision tower encodes


def rollout(rng: random.Random, spread: str) -> tuple[list[int], list[int]]:
    """Prompt length of each of the PROMPTS prompts, completion length of each of its G sequences
    (prompt-major: sequence i belongs to prompt i // G)."""
    prompts, completions = [], []
    for _ in range(PROMPTS):
        prompts.append(rng.randint(300, 800))
        for _ in range(G):
            if spread == "uniform":
                completions.append(rng.randint(50, 1024))
            else:
                completions.append(1024 if rng.random() < 0.3 else rng.randint(50, 600))
    return prompts, completions


def padded(prompts, completions, b: int, sort: bool) -> list[Micro]:
    """b sequences per micro-batch, each padded to the longest; every sequence encodes its
    image (the transformers forward does)."""
    lengths = [prompts[i // G] + c for i, c in enumerate(completions)]
    order = sorted(lengths) if sort else lengths
    return [Micro(sum(batch), len(batch) * max(batch), len(batch))
            for batch in (order[i: i + b] for i in range(0, len(order), b))]


def packed(prompts, completions, max_tokens: int) -> list[Micro]:
    """train.packed_microbatches with share_prompts off: siblings together where they fit."""
    lengths = [prompts[i // G] + c for i, c in enumerate(completions)]
    plan = plan_microbatches(lengths, max_tokens, groups=[i // G for i in range(len(lengths))])
    return [Micro(sum(lengths[i] for i in idx), sum(lengths[i] for i in idx), len({i // G for i in idx}))
            for idx in plan]


def shared(prompts, completions, max_tokens: int) -> list[Micro]:
    """train.packed_microbatches with share_prompts on: [prompt, c1, ..., cG] rows."""
    # Only lengths and equality of prompts matter to the planner: prompt p is P copies of p.
    sequences = [Sequence([i // G] * prompts[i // G], [0] * c) for i, c in enumerate(completions)]
    micro = []
    for idx in plan_shared_microbatches(sequences, max_tokens).microbatches:
        groups = {i // G for i in idx}
        rows = sum(prompts[p] for p in groups) + sum(completions[i] for i in idx)
        micro.append(Micro(rows, rows, len(groups)))
    return micro


def lockstep_step(per_rank: list[list[Micro]]) -> dict:
    """Every rank padded with fillers to the largest count (engine.lockstep), then costed."""
    steps = max(len(m) for m in per_rank)
    filler = Micro(0, FILLER_ROWS, 1)
    ranks = [m + [filler] * (steps - len(m)) for m in per_rank]
    useful = sum(m.useful for rank in ranks for m in rank)
    rows = sum(m.rows for rank in ranks for m in rank)
    charged = sum(WORLD_SIZE * max(rank[k].rows for rank in ranks) for k in range(steps))
    return {"useful": useful, "rows": rows, "charged": charged, "steps": steps,
            "fillers": sum(steps - len(m) for m in per_rank),
            "encodings": sum(m.encodings for m in sum(per_rank, []))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the markdown table here too")
    args = parser.parse_args()

    methods = [
        ("padded, 4 per micro-batch (one GRPO group)", lambda P, C: padded(P, C, 4, sort=False), None),
        ("padded, 8 per micro-batch", lambda P, C: padded(P, C, 8, sort=False), None),
        ("padded, 8 per micro-batch, sorted by length", lambda P, C: padded(P, C, 8, sort=True), None),
        ("packed, share_prompts off, max_tokens 8192", lambda P, C: packed(P, C, 8192), 8192),
        ("packed, share_prompts off, max_tokens 16384", lambda P, C: packed(P, C, 16384), 16384),
        ("packed, share_prompts on, max_tokens 8192", lambda P, C: shared(P, C, 8192), 8192),
        ("packed, share_prompts on, max_tokens 16384 (default)", lambda P, C: shared(P, C, 16384), 16384),
    ]
    per_prompt_rank = PROMPTS // WORLD_SIZE
    rows = []
    for spread in ("uniform", "capped"):
        for label, plan, budget in methods:
            cost, per_rank, lock, steps, fillers, fill, encodings = [], [], [], [], [], [], []
            for seed in range(STEPS):
                prompts, completions = rollout(random.Random(seed), spread)
                # Rank r holds prompts r*16 .. r*16+15 of the step (the step's order is random).
                micro = [plan(prompts[r * per_prompt_rank: (r + 1) * per_prompt_rank],
                              completions[r * per_prompt_rank * G: (r + 1) * per_prompt_rank * G])
                         for r in range(WORLD_SIZE)]
                step = lockstep_step(micro)
                cost.append(step["rows"] / (sum(prompts) * G + sum(completions)))
                per_rank.append(step["useful"] / step["rows"])
                lock.append(step["useful"] / step["charged"])
                steps.append(step["steps"])
                fillers.append(step["fillers"])
                encodings.append(step["encodings"] / len(completions))
                if budget:
                    fill.append(step["useful"] / (step["steps"] * WORLD_SIZE * budget))
            rows.append(
                f"| {spread} | {label} | {statistics.mean(cost):.3f} | {statistics.mean(per_rank):.1%} "
                f"| {statistics.mean(lock):.1%} | {min(lock):.1%} | {statistics.mean(steps):.1f} "
                f"| {statistics.mean(fillers):.2f} | {f'{statistics.mean(fill):.1%}' if fill else '-'} "
                f"| {statistics.mean(encodings):.2f} |"
            )

    table = "\n".join(
        [
            "# Padding efficiency: the trainer's packed micro-batches vs padded ones",
            "",
            "Command: `python benchmarks/bench_packing.py --out benchmarks/results/packing_efficiency.md`",
            "",
            f"One step = {PROMPTS} prompts x G={G} completions = {PROMPTS * G} sequences over "
            f"{WORLD_SIZE} data-parallel ranks, {per_prompt_rank} prompts each; means over {STEPS} random "
            f"steps (seeds 0-{STEPS - 1}). Prompt 300-800 tokens (shared by the G siblings), completion "
            "50-1024 (uniform) or 30% at the 1024 cap and the rest 50-600 (capped). Each rank plans its "
            "own micro-batches as train.py does; engine.lockstep then pads every rank to the largest "
            f"micro-batch count with {FILLER_ROWS}-row fillers. Rows / sequence tokens: all rows the "
            "ranks compute (padding and fillers included) over the tokens of the unshared sequences; "
            "below 1 when prompts are shared. Efficiency = useful rows / rows computed (per rank) or "
            "charged (lockstep: each micro-batch step at its largest micro-batch over the ranks). "
            "Budget fill: useful rows / (micro-batches per rank x ranks x max_tokens). Tokens only: "
            "attention's quadratic term is not counted, and padded batches also pay it on their "
            f"padding. Image encodings per sequence: 1/G = {1 / G:.2f} at best, when all G siblings "
            "share a micro-batch.",
            "",
            "| completions | batching | rows / sequence tokens | efficiency per rank | efficiency lockstep "
            "| lockstep, worst step | micro-batches per rank | fillers per step | budget fill "
            "| image encodings per sequence |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Python {platform.python_version()}; token counting only, no model or device involved.",
        ]
    )
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
