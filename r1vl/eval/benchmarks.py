"""The eight benchmarks of the paper's Table 1: columns, scorer and metrics of each.

A benchmark file is VLMEvalKit's TSV for it (r1vl.eval.tsv); rows with an empty image are
dropped and counted as VLMEvalKit's skip_noimg does. Every other row is checked when the file
is read: the columns VLMEvalKit's scorer reads must be there (a list literal where it parses
one), and a question (a cell pandas reads as missing, VLMEvalKit would ask as 'nan'). A row that fails is an error naming the file, the row and the reason, or with
skip_bad_rows a skip that is counted and reported. No row is refused because its own gold
answer would not score right: under VLMEvalKit's rules some never do (MathVista's text and
list answers), and those items count as VLMEvalKit counts them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from r1vl.eval import protocols, verdicts, vlmevalkit
from r1vl.eval.tsv import EvalInputError, Item, Table, read_tsv


@dataclass(frozen=True)
class Benchmark:
    name: str  # the paper's name for it, used in file names and the table
    column: str  # the paper's Table 1 column header
    columns: tuple[str, ...]  # required TSV columns besides the image
    score: verdicts.Scorer
    aggregate: Callable[[verdicts.Scored], dict]
    aliases: tuple[str, ...] = ()
    check: Callable[[Item], None] = field(default=lambda item: None)  # extra row checks
    layout: str = "tsv"  # tsv: VLMEvalKit's TSV; records: the trainer's JSONL (r1vl.eval.jsonl)
    judge: str = "never"  # never / some (items the rule cannot read) / always: when VLMEvalKit asks its judge

    def question(self, item: Item, protocol: str = "paper") -> str:
        """The user turn's text (the image comes before it) under `protocol` (r1vl.eval.protocols)."""
        return protocols.question(self.name, item, protocol)


def _check_list(column: str) -> Callable[[Item], None]:
    def check(item: Item) -> None:
        if vlmevalkit.literal(item.fields[column]) is vlmevalkit.MISSING:
            raise ValueError(f"{column} is not a list literal: {item.fields[column][:80]!r}")
    return check


def _check_mathvista(item: Item) -> None:
    if item.fields["question_type"] == "multi_choice":
        for column in ("answer_option", "choices"):
            if column not in item.fields:
                raise ValueError(f"a multi_choice row without the column {column!r}")
        _check_list("choices")(item)


def _check_mme(item: Item) -> None:
    if not item.fields["category"].strip():
        raise ValueError("empty category")


def _check_hallusion(item: Item) -> None:
    verdicts.hallusion_ids(item)


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("MathVista", "MathVista", ("index", "question", "answer", "question_type", "answer_type"),
              verdicts.score_mathvista, verdicts.aggregate_mathvista, aliases=("MathVista_MINI",),
              check=_check_mathvista, judge="some"),
    Benchmark("MMStar", "MMStar", ("index", "question", "answer", "A", "B"), verdicts.score_mcq,
              verdicts.accuracy(("category", "l2-category")), judge="some"),
    Benchmark("MathVision", "Math-V", ("index", "question", "answer", "choices"), verdicts.score_mathvision,
              verdicts.accuracy(("category",)), aliases=("Math-V", "MathV", "MathVision_MINI"),
              check=_check_list("choices"), judge="some"),
    Benchmark("ChartQA", "ChartQA", ("index", "question", "answer"), verdicts.score_chartqa,
              verdicts.accuracy(("split", "category")), aliases=("ChartQA_TEST",)),
    Benchmark("DynaMath", "DynaMath", ("index", "question", "answer", "answer_type", "qid", "varid"),
              verdicts.score_dynamath, verdicts.aggregate_dynamath, judge="some"),
    Benchmark("HallusionBench", "HallBench", ("index", "question", "answer"), verdicts.score_yorn,
              verdicts.aggregate_hallusion, aliases=("HallBench",), check=_check_hallusion, judge="some"),
    Benchmark("MathVerse", "MathVerse", ("index", "question", "answer", "question_for_eval"),
              verdicts.score_mathverse, verdicts.accuracy(("problem_version",)),
              aliases=("MathVerse_MINI", "MathVerse_MINI_Vision_Only"), judge="always"),
    Benchmark("MME", "MME_sum", ("index", "question", "answer", "category"), verdicts.score_yorn,
              verdicts.aggregate_mme, check=_check_mme, judge="some"),
    # Not in the paper: the trainer's own data (e.g. the synthetic task's held-out prompts).
    Benchmark("R1VL", "R1VL", (), verdicts.score_reference, verdicts.accuracy(("task",)),
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


def load(bench: Benchmark, path: str | Path, skip_bad_rows: bool = False, last: int | None = None,
         keep_na_text: bool = False) -> Table:
    """The file's items, every row checked (module docstring). Raises EvalInputError.

    last: for the records layout, only the last `last` records (train.py's held-out ones).
    keep_na_text: TSV cells reading "None", "NA", "nan", ... stay text (r1vl.eval.tsv; --fix na-text)."""
    if bench.layout == "records":
        from r1vl.eval.jsonl import read_records

        table = read_records(path, last, skip_bad_rows)
    else:
        table = read_tsv(path, bench.columns, keep_na_text)
    good = []
    for item in table.items:
        try:
            if bench.layout == "tsv" and item.fields["question"] == "":
                raise ValueError("no question: the cell is empty or reads as missing to pandas (None, NA, nan, ...), "
                                 "and VLMEvalKit would ask 'nan' (--fix na-text keeps such text)")
            bench.check(item)
            for protocol in protocols.CONCRETE:
                bench.question(item, protocol)
        except (ValueError, KeyError) as e:
            reason = str(e) if str(e).startswith(item.where()) else f"{item.where()}: {e}"
            if not skip_bad_rows:
                raise EvalInputError(reason) from None
            table.skipped.append(reason)
            continue
        good.append(item)
    table.items = good
    return table
