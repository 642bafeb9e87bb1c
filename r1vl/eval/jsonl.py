"""The trainer's own data files as a benchmark: R1-VL-10K style JSONL records (r1vl.data.records).

    python -m r1vl.eval --model RUN/final --bench R1VL=RUN/synthetic/data.jsonl --last 32 --out DIR

scores the built-in run's final policy on the synthetic task's held-out prompts: train.py
holds out the last --eval_prompts records of its data file, and `last` takes the same ones.
Each record's gold answer is its solution's final-answer line; the rule is the trainer's
answer accuracy (exact match, then math-verify), on the answer found by r1vl.eval.extract.
"""
from __future__ import annotations

from pathlib import Path

from r1vl.eval.trainer_api import BadRecordError, load_examples, reference_answer
from r1vl.eval.tsv import EvalInputError, Item, Table


def read_records(path: str | Path, last: int | None = None, skip_bad_rows: bool = False) -> Table:
    """Items for the records of a JSON/JSONL file (images checked), only the last `last` if given."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: no such file")
    try:
        loaded = load_examples(path, skip_bad_records=skip_bad_rows)
    except BadRecordError as e:
        raise EvalInputError(str(e)) from None
    examples = list(enumerate(loaded.items))
    if last is not None:
        examples = examples[len(examples) - last:] if last < len(examples) else examples
    items = []
    for position, example in examples:
        index = example.source.rsplit(":", 1)[-1] if example.source else str(position)
        fields = {"index": index, "question": example.problem, "answer": reference_answer(example.solution),
                  "solution": example.solution}
        items.append(Item(str(path), int(index) + 1, index, fields, "", str(example.image_path),
                          str(example.image_path)))
    return Table(path, items, [str(bad) for bad in loaded.bad])
