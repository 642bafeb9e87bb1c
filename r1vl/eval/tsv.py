"""VLMEvalKit's benchmark TSVs: one row per question, images inline.

The layout (what `vlmeval` writes and reads): a header line, then one tab-separated row per
item, fields quoted CSV-style when they hold tabs, quotes or line breaks. Columns this
module relies on:

- `index`: the item's id, unique in the file;
- `image`: the image as base64 (PNG/JPEG bytes); a short value (<= 64 characters) is the
  `index` of another row whose image it shares (MME stores each image once for its pair of
  questions); an empty cell drops the row, counted in Table.no_image (VLMEvalKit's
  skip_noimg: the real HallusionBench file has 178 such rows); or, without an `image`
  column, `image_path`: a file relative to the TSV;
- `question`, `answer` and each benchmark's own columns (see r1vl.eval.benchmarks).

Missing cells are read as VLMEvalKit reads them (pandas.read_csv with its default na_values): a
cell that is exactly one of pandas' default NA strings (PANDAS_NA_STRINGS: "None", "NA", "nan",
"N/A", "NULL", ...; matched after CSV unquoting, case and spaces included) is a missing value, as
an empty cell is: '' in Item.fields. So VLMEvalKit's prompts drop an MMStar option or hint that
reads "None" (its build_prompt skips pd.isna cells), and an image cell that reads "NA" drops the
row as an empty one does. `index` and `image_path` are left as written. keep_na_text (python -m
r1vl.eval --fix na-text) keeps such cells as text instead.

Numbers are read as VLMEvalKit reads them (pandas.read_csv): a column whose non-empty cells are
all numbers holds numbers, whose text is what str() gives: "12" stays "12" in a column of whole
numbers, and becomes "12.0" where another cell has a fraction or an empty cell (a float column);
"007" becomes "7". This changes verdicts: ChartQA's zero answer
"0.0" no longer equals "0" (MathVista's int() of a float answer still works: Item.float_columns).
The real benchmark files' answer columns mix text and numbers (kept as
text), so it shows only on subsets. `index`, `image` and `image_path` are left as written.

Every problem is reported with the file, the 1-based data row (the header is row 0) and the
item's index.
"""
from __future__ import annotations

import base64
import binascii
import csv
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

_REFERENCE_MAX = 64  # VLMEvalKit's rule: an image field this short names another row


class EvalInputError(ValueError):
    """Bad benchmark input: the message names the file, the row and the reason."""


@dataclass(frozen=True)
class Item:
    """One benchmark question."""

    source: str  # the TSV path, for messages
    row: int  # 1-based data row
    index: str
    fields: dict[str, str]  # every column but `image`, as text ('' for an empty or NA cell)
    image_b64: str  # base64 image bytes ('' when image_path is used)
    image_path: str  # a file, when the TSV has no image column ('' otherwise)
    image_key: str  # what MME pairs questions by: image_path if given, else the row holding the image
    float_columns: frozenset = frozenset()  # columns pandas reads as float64 (pandas_numbers)

    def where(self) -> str:
        return f"{self.source}: row {self.row} (index {self.index})"

    def image_bytes(self) -> bytes:
        """The encoded image file. Raises EvalInputError naming the row when unreadable."""
        if self.image_b64:
            try:
                return base64.b64decode(self.image_b64, validate=False)
            except (binascii.Error, ValueError) as e:
                raise EvalInputError(f"{self.where()}: image is not valid base64 ({e})") from None
        try:
            return Path(self.image_path).read_bytes()
        except OSError as e:
            raise EvalInputError(f"{self.where()}: cannot read image file {self.image_path} ({e})") from None


@dataclass
class Table:
    """The items of one file and the rows skipped (only with skip_bad_rows)."""

    path: Path
    items: list[Item]
    skipped: list[str]  # "row N (index I): reason"
    no_image: list[str] = field(default_factory=list)  # indexes of rows dropped as VLMEvalKit's skip_noimg does


def read_tsv(path: str | Path, required: tuple[str, ...] = ("index", "question", "answer"),
             keep_na_text: bool = False) -> Table:
    """Read a benchmark TSV into Items.

    Args:
        path: the TSV file.
        required: columns every row must have (besides an image: `image` or `image_path`).
        keep_na_text: keep cells reading "None", "NA", "nan", ... as text; by default they are
            missing values, as pandas (VLMEvalKit's reader) reads them (module docstring).

    Raises:
        EvalInputError: missing file or column, a row with the wrong number of fields, a
            duplicate index, an image reference to a row without an image.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: no such file")
    csv.field_size_limit(sys.maxsize)  # base64 images are megabytes long
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        try:
            header = next(reader)
        except StopIteration:
            raise EvalInputError(f"{path}: empty file (no header)") from None
        except csv.Error as e:
            raise EvalInputError(f"{path}: row 0: unreadable header ({e})") from None
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise EvalInputError(f"{path}: missing column(s) {missing} (header: {header})")
        if "image" not in header and "image_path" not in header:
            raise EvalInputError(f"{path}: no image column ('image' with base64 or 'image_path')")
        rows = []
        row_no = 0
        try:
            for row_no, values in enumerate(reader, start=1):
                if not values:  # a blank line
                    continue
                if len(values) != len(header):
                    raise EvalInputError(f"{path}: row {row_no}: {len(values)} fields, the header has {len(header)}")
                rows.append((row_no, dict(zip(header, values))))
        except csv.Error as e:
            raise EvalInputError(f"{path}: row {row_no + 1}: unreadable ({e})") from None
    if not keep_na_text:
        pandas_missing(rows)
    return _items(path, rows, pandas_numbers(rows))


# pandas.read_csv's default na_values: pandas._libs.parsers.STR_NA_VALUES without '' (an empty cell,
# missing here anyway); "None" is in it since pandas 2.0. Checked against the installed pandas by
# tests/r1vl/eval/test_eval_tsv.py.
PANDAS_NA_STRINGS = frozenset({
    "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
    "NULL", "NaN", "None", "n/a", "nan", "null"})
_AS_WRITTEN = ("index", "image_path")  # never emptied: a row keeps its name and its image file


def pandas_missing(rows: list[tuple[int, dict[str, str]]]) -> None:
    """Empty, in place, every cell pandas.read_csv reads as missing (PANDAS_NA_STRINGS, exact
    match), except in `index` and `image_path`."""
    for _, fields in rows:
        for column, cell in fields.items():
            if cell in PANDAS_NA_STRINGS and column not in _AS_WRITTEN:
                fields[column] = ""


_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_UNTYPED = ("index", "image", "image_path")


def pandas_numbers(rows: list[tuple[int, dict[str, str]]]) -> frozenset:
    """Rewrite, in place, the cells of each numeric column as pandas.read_csv's dtype and str()
    give them (module docstring): int64 when every cell is a whole number, else float64 when every
    non-empty cell is a number (empty cells stay ''). Returns the float64 columns."""
    floats = set()
    if not rows:
        return frozenset()
    for column in rows[0][1]:
        if column in _UNTYPED:
            continue
        cells = [fields[column].strip() for _, fields in rows]
        filled = [c for c in cells if c]
        if not filled or not all(_FLOAT.fullmatch(c) for c in filled):
            continue
        whole = len(filled) == len(cells) and all(_INT.fullmatch(c) for c in filled)
        if not whole:
            floats.add(column)
        for _, fields in rows:
            cell = fields[column].strip()
            if cell:
                fields[column] = str(int(cell)) if whole else str(float(cell))
    return frozenset(floats)


def _items(path: Path, rows: list[tuple[int, dict[str, str]]], float_columns: frozenset = frozenset()) -> Table:
    by_index: dict[str, tuple[int, dict[str, str]]] = {}
    for row_no, fields in rows:
        index = fields["index"].strip()
        if not index:
            raise EvalInputError(f"{path}: row {row_no}: empty index")
        if index in by_index:
            raise EvalInputError(f"{path}: row {row_no}: index {index!r} repeats row {by_index[index][0]}")
        by_index[index] = (row_no, fields)
    items, no_image = [], []
    for index, (row_no, fields) in by_index.items():
        image = fields.get("image", "").strip()
        image_b64, image_path, key = "", "", index
        if "image" in fields:
            if not image:  # image_base.py ImageBaseDataset(skip_noimg=True) drops the row: counted, not an error
                no_image.append(index)
                continue
            if len(image) <= _REFERENCE_MAX:  # the index of the row holding this image
                target = by_index.get(image)
                if target is None or len(target[1].get("image", "").strip()) <= _REFERENCE_MAX:
                    raise EvalInputError(f"{path}: row {row_no} (index {index}): image refers to index "
                                         f"{image!r}, which is not a row with an image")
                image, key = target[1]["image"].strip(), image
            image_b64 = image
        else:
            relative = fields["image_path"].strip()
            if not relative:
                raise EvalInputError(f"{path}: row {row_no} (index {index}): empty image_path")
            image_path = str(path.parent / relative)
            key = relative
        if fields.get("image_path", "").strip():  # MME pairs its questions by image_path when it has one
            key = fields["image_path"].strip()
        rest = {k: v for k, v in fields.items() if k != "image"}
        items.append(Item(str(path), row_no, index, rest, image_b64, image_path, key, float_columns))
    return Table(path, items, [], no_image)


def without_images(table: Table) -> Table:
    """The same items without their base64 images (scoring never reads them): the eight
    benchmark files hold gigabytes of images, which need not stay in memory on every rank."""
    return Table(table.path, [replace(item, image_b64="") for item in table.items], table.skipped, table.no_image)
