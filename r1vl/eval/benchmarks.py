"""The eight benchmarks of the paper's Table 1: columns, prompt, rule and metric of each.

A benchmark file is VLMEvalKit's TSV for it (r1vl.eval.tsv). Every row is checked when the
file is read: the columns its rule needs must parse, and its own gold answer, scored as if
the model had written it, must come out right. A row that fails is an error naming the
file, the row and the reason, or with skip_bad_rows a skip that is counted and reported.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from r1vl.eval import extract, metrics
from r1vl.eval.tsv import EvalInputError, Item, Table, read_tsv

PROMPTS = ("r1vl", "plain")


@dataclass(frozen=True)
class Benchmark:
    name: str  # the paper's name for it, used in file names and the table
    column: str  # the paper's Table 1 column header
    columns: tuple[str, ...]  # required TSV columns besides the image
    match: metrics.Matcher
    aggregate: Callable[[metrics.Scored], dict]
    instruction: str = ""  # appended with --prompt plain (VLMEvalKit's short-answer hints)
    aliases: tuple[str, ...] = ()
    check: Callable[[Item], None] = field(default=lambda item: None)  # extra row checks
    layout: str = "tsv"  # tsv: VLMEvalKit's TSV; records: the trainer's JSONL (r1vl.eval.records)

    def question(self, item: Item, prompt: str = "r1vl") -> str:
        """The user turn's text (the image comes before it). r1vl: the question as the paper
        trains on it, options included; plain: the same plus the benchmark's answer hint."""
        text = item.fields["question"].strip()
        hint = item.fields.get("hint", "").strip()
        if self.match is metrics.match_mcq:
            options = metrics.options_from_columns(item)
            text = (f"Hint: {hint}\n" if hint else "") + f"Question: {text}\nOptions:\n" + "".join(
                f"{k}. {v}\n" for k, v in options.items())
        elif self.match is metrics.match_mathvision:
            options = extract.options_from_list(item.fields.get("choices", ""), item.where())
            if options and "(A)" not in text and "A." not in text:  # options not yet in the question
                text += "\nChoices: " + " ".join(f"({k}) {v}" for k, v in options.items())
        if prompt == "plain" and self.instruction:
            text = text.rstrip("\n") + "\n" + self.instruction
        return text

    def gold(self, item: Item) -> str:
        """The gold answer as a model would write it (for the row self-check)."""
        f = item.fields
        if self.match is metrics.match_mathvista and f.get("answer_option", "").strip():
            return f["answer_option"].strip()
        if self.match is metrics.match_chartqa and f["answer"].strip().startswith("["):
            return next(iter(extract.options_from_list(f["answer"], item.where()).values()), "")
        return f["answer"].strip()


def _check_mme(item: Item) -> None:
    if not item.fields["category"].strip():
        raise ValueError("empty category")


def _check_hallusion(item: Item) -> None:
    metrics.hallusion_ids(item)


_MC_HINT = "Answer with the option's letter from the given choices directly."
_SHORT_HINT = "Answer the question using a single word or phrase."
_YN_HINT = "Please answer yes or no."

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("MathVista", "MathVista", ("index", "question", "answer", "question_type", "answer_type"),
              metrics.match_mathvista, metrics.accuracy(("task",)), aliases=("MathVista_MINI",)),
    Benchmark("MMStar", "MMStar", ("index", "question", "answer", "A", "B"), metrics.match_mcq,
              metrics.accuracy(("category", "l2-category")), _MC_HINT),
    Benchmark("MathVision", "Math-V", ("index", "question", "answer"), metrics.match_mathvision,
              metrics.accuracy(("subject", "level")), aliases=("Math-V", "MathV", "MathVision_MINI")),
    Benchmark("ChartQA", "ChartQA", ("index", "question", "answer"), metrics.match_chartqa,
              metrics.accuracy(("split", "category")), _SHORT_HINT, aliases=("ChartQA_TEST",)),
    Benchmark("DynaMath", "DynaMath", ("index", "question", "answer", "answer_type"),
              metrics.match_dynamath, metrics.aggregate_dynamath),
    Benchmark("HallusionBench", "HallBench", ("index", "question", "answer"), metrics.match_yes_no,
              metrics.aggregate_hallusion, _YN_HINT, aliases=("HallBench",), check=_check_hallusion),
    Benchmark("MathVerse", "MathVerse", ("index", "question", "answer"), metrics.match_mathverse,
              metrics.accuracy(("problem_version",)),
              aliases=("MathVerse_MINI", "MathVerse_MINI_Vision_Only")),
    Benchmark("MME", "MME_sum", ("index", "question", "answer", "category"), metrics.match_yes_no,
              metrics.aggregate_mme, check=_check_mme),
    # Not in the paper: the trainer's own data (e.g. the synthetic task's held-out prompts).
    Benchmark("R1VL", "R1VL", (), metrics.match_reference, metrics.accuracy(("task",)),
              aliases=("synthetic", "heldout"), layout="records"),
)}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


_BY_KEY = {_key(n): b for b in BENCHMARKS.values() for n in (b.name, *b.aliases)}


def get(name: str) -> Benchmark:
    """The benchmark called `name` (case, '-' and '_' ignored; VLMEvalKit's names accepted)."""
    bench = _BY_KEY.get(_key(name))
    if bench is None:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return bench


def load(bench: Benchmark, path: str | Path, skip_bad_rows: bool = False, last: int | None = None) -> Table:
    """The file's items, every row checked (module docstring). Raises EvalInputError.

    last: for the records layout, only the last `last` records (train.py's held-out ones)."""
    if bench.layout == "records":
        from r1vl.eval.records import read_records

        table = read_records(path, last, skip_bad_rows)
    else:
        table = read_tsv(path, bench.columns)
    good = []
    for item in table.items:
        try:
            bench.check(item)
            bench.question(item)
            outcome = bench.match(item, bench.gold(item))
            if not outcome.correct:
                raise ValueError(f"its own answer {item.fields['answer'].strip()[:80]!r} does not score "
                                 f"as correct under the {bench.name} rule (a malformed row)")
        except (ValueError, KeyError) as e:
            reason = str(e) if str(e).startswith(item.where()) else f"{item.where()}: {e}"
            if not skip_bad_rows:
                raise EvalInputError(reason) from None
            table.skipped.append(reason)
            continue
        good.append(item)
    table.items = good
    return table
