"""Predictions for one benchmark file: greedy completions from the trainer's sampler.

Items are split over ranks (item i goes to rank i mod world_size, after dropping the items
that already have a line on disk), encoded with the trainer's prompt format
(r1vl.data.prompts.encode_prompt: system turn, the image, then the question), decoded in
batches of `batch_size` prompts (the image encoded once per prompt) and appended to this
rank's predictions file after every batch.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from r1vl.eval import predictions
from r1vl.eval.benchmarks import Benchmark
from r1vl.eval.trainer_api import (
    Example,
    Policy,
    Prompt,
    distributed,
    encode_prompt,
    eos_ids,
    family_of,
    greedy,
    progress_bar,
)
from r1vl.eval.tsv import EvalInputError, Item, Table


def encode_item(item: Item, question: str, policy: Policy, scratch: Path, max_pixels: int,
                min_pixels: int) -> Prompt:
    """The item's prompt. Raises EvalInputError naming the row when its image is unreadable."""
    path = scratch / "image"
    path.write_bytes(item.image_bytes())  # encode_prompt reads images from files
    example = Example(image_path=path, problem=question, solution="", source=item.where())
    merge = policy.model.config.vision_config.spatial_merge_size
    try:
        return encode_prompt(example, policy.tokenizer, policy.image_processor, merge, max_pixels, min_pixels,
                             family_of(policy.model).default_system)
    except ValueError as e:
        raise EvalInputError(f"{item.where()}: unreadable image ({str(e).replace(str(path), 'image')})") from None


def shard(table: Table, bench_dir: Path, world) -> list[Item]:
    """This rank's share of the items that have no prediction on disk yet: item i of the
    remaining ones goes to rank i mod world_size. Every rank reads the old parts before any
    rank appends (a barrier), so all ranks agree on what remains."""
    done = predictions.read_all(bench_dir) if bench_dir.exists() else {}
    todo = [item for item in table.items if item.index not in done]
    distributed.barrier()
    return todo[world.rank::world.world_size]


def generate_items(policy: Policy, bench: Benchmark, items: list[Item], bench_dir: Path, rank: int, *,
                   prompt: str = "paper", batch_size: int = 8, max_new_tokens: int = 1024,
                   max_pixels: int = 400000, min_pixels: int = 3136, skip_bad_rows: bool = False,
                   progress: bool = True) -> None:
    """Greedy predictions for `items`, appended to rank `rank`'s file after every batch; `prompt` is
    the protocol whose question text is asked (r1vl.eval.protocols)."""
    if not items:
        return
    writer = predictions.Writer(bench_dir, rank)
    eos = eos_ids(policy.tokenizer)
    bar = progress_bar(len(items), bench.name, progress, unit="item", file=sys.stderr)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for start in range(0, len(items), batch_size):
                batch = items[start:start + batch_size]
                records, prompts, kept = [], [], []
                for item in batch:
                    try:
                        prompts.append(encode_item(item, bench.question(item, prompt), policy, Path(scratch),
                                                   max_pixels, min_pixels))
                        kept.append(item)
                    except EvalInputError as e:
                        if not skip_bad_rows:
                            raise
                        records.append({"index": item.index, "skipped": str(e)})
                if prompts:
                    for item, ids in zip(kept, greedy(policy.model, prompts, max_new_tokens, eos)):
                        stopped = len(ids) > 0 and int(ids[-1]) in eos
                        records.append({"index": item.index,
                                        "prediction": policy.tokenizer.decode(ids, skip_special_tokens=True),
                                        "tokens": len(ids), "stopped": stopped})
                writer.write(records)
                bar.update(len(batch))
    finally:
        writer.close()
        bar.close()


def generate_benchmark(policy: Policy, bench: Benchmark, table: Table, bench_dir: Path, world, *,
                       progress: bool = True, **options) -> int:
    """Generate every missing prediction of `table` (this rank's share; options as in
    generate_items); returns how many items this rank handled."""
    items = shard(table, bench_dir, world)
    generate_items(policy, bench, items, bench_dir, world.rank, progress=progress and world.is_main, **options)
    return len(items)

