"""--data as a sequence of Examples, checked at start-up and made lazily, one row at a time.

    examples = open_examples(TableOptions.of(cfg.dataset))   # before the model loads: raises ValueError
    len(examples), examples[i], examples[a:b]          # an Example per row, made when asked for

What is checked when (docs/data.md):
- at start-up, on every row: the columns (a prompt and an image column, a reference), each
  value's type, the images' number against the "<image>" tags or image parts and against
  --max_images, that image files exist; with --check_images all (the default) every image is
  also opened and verified (its whole file read, not decoded);
- when a row is used: its images are decoded; an image that then fails stops the run with a
  BadRecordError naming the record.
A bad record stops the start-up with its file, index and reason; with --skip_bad_records it is
left out, and the start-up line counts it and a warning lists it.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from r1vl.data.records import BadRecord, BadRecordError, _Bad
from r1vl.data.schemas import Schema, detect_schema, image_values, resolve_image, row_example
from r1vl.data.sources import Source, open_source

logger = logging.getLogger(__name__)
_BATCH = 1024  # rows per Arrow batch in the start-up pass


@dataclass(frozen=True)
class TableOptions:
    """The options that say how --data becomes Examples."""

    path: str
    image_root: str = ""  # "" = the data file's directory (a directory --data: itself)
    prompt_key: str = ""
    image_key: str = ""
    solution_key: str = ""
    answer_key: str = ""
    max_images: int = 1  # images per prompt at most; 0 = no cap
    check_images: str = "all"  # "all": open every image at start-up; "lazy": files must exist
    skip_bad_records: bool = False

    @classmethod
    def of(cls, dataset, path: str | None = None) -> TableOptions:
        """From the run's r1vl.config.DataOptions; path: the data to read instead of dataset.data."""
        return cls(path if path is not None else dataset.data, dataset.image_root, dataset.prompt_key,
                   dataset.image_key, dataset.solution_key, dataset.answer_key, dataset.max_images,
                   dataset.check_images, dataset.skip_bad_records)


class ExampleTable(Sequence):
    """The usable rows of a Source as Examples, each made when indexed (slices are views)."""

    def __init__(self, source: Source, schema: Schema, root: Path, max_images: int, rows: list[int],
                 bad: list[BadRecord]) -> None:
        self.source, self.schema, self.root, self.max_images = source, schema, root, max_images
        self.rows = rows  # the source rows this table holds, in order
        self.bad = bad  # the records left out (--skip_bad_records)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ExampleTable(self.source, self.schema, self.root, self.max_images, self.rows[i], self.bad)
        row = self.rows[i]
        try:
            return row_example(_row(self.source, row), self.schema, self.root, f"{self.source.path}:{row}",
                               self.max_images)
        except _Bad as e:
            raise BadRecordError(BadRecord(str(self.source.path), row, str(e))) from None

    def summary(self) -> str:
        text = (f"data: {self.source.path} ({self.source.how}): {len(self)} records, columns {self.schema.describe()}"
                + (f", skipped {len(self.bad)} bad (--skip_bad_records)" if self.bad else ""))
        return text + "".join(f"\n  {b}" for b in self.bad[:20]) + ("\n  ..." if len(self.bad) > 20 else "")


def _row(source: Source, index: int) -> dict:
    if source.table is not None:  # zero-copy slice; images stay as stored ({"bytes", "path"} structs)
        return source.decode(source.table.slice(index, 1).to_pylist()[0])
    record = source.records[index]
    if isinstance(record, BadRecord):
        raise _Bad(record.reason)
    return record


def _rows(source: Source) -> Iterator[tuple[int, dict | BadRecord]]:
    """Every row, Arrow batch by batch (Python objects for one batch at a time)."""
    if source.table is None:
        yield from enumerate(source.records)
        return
    index = 0
    for batch in source.table.to_batches(max_chunksize=_BATCH):
        for row in batch.to_pylist():
            yield index, source.decode(row)
            index += 1


def open_examples(options: TableOptions) -> ExampleTable:
    """--data as an ExampleTable, every row checked (see the module docstring).

    Raises:
        ValueError: the data cannot be read or has no usable columns (named), or a bad record
            (a BadRecordError naming the file, the record and the reason) unless skip_bad_records.
    """
    if options.check_images not in ("all", "lazy"):
        raise ValueError(f'--check_images must be "all" or "lazy", got {options.check_images!r}')
    source = open_source(options.path)
    path = Path(options.path)
    schema = detect_schema(source.columns, prompt_key=options.prompt_key, image_key=options.image_key,
                           solution_key=options.solution_key, answer_key=options.answer_key,
                           where=f"--data {path}")
    if source.table is not None:
        _check_types(source, schema, path)
    root = Path(options.image_root) if options.image_root else (path if path.is_dir() else path.parent)
    rows, bad = [], []
    for index, row in _rows(source):
        reason = row.reason if isinstance(row, BadRecord) else _check_row(row, schema, root, index, source, options)
        if reason is None:
            rows.append(index)
            continue
        record = BadRecord(str(path), index, reason)
        if not options.skip_bad_records:
            raise BadRecordError(record)
        bad.append(record)
    table = ExampleTable(source, schema, root, options.max_images, rows, bad)
    if bad:
        logger.warning("%s", table.summary())
    return table


def _check_row(row: dict, schema: Schema, root: Path, index: int, source: Source, options: TableOptions) -> str | None:
    """Why the row is bad, or None."""
    try:
        row_example(row, schema, root, f"{source.path}:{index}", options.max_images)
        for value in image_values(row.get(schema.images)):
            _check_image(resolve_image(value, root), options.check_images == "all")
    except _Bad as e:
        return str(e)
    return None


def _check_image(image, verify: bool) -> None:
    """A file image must exist; with `verify` every image is opened and its structure read."""
    import io

    from PIL import Image

    if isinstance(image, Path) and not image.is_file():
        raise _Bad(f"image not found: {image}")
    if not verify or isinstance(image, Image.Image):
        return
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
            im.verify()  # reads the whole file and checks its structure, without decoding
    except Exception as e:  # noqa: BLE001 - pillow raises many types for bad files
        what = image if isinstance(image, Path) else f"({len(image)} bytes)"
        raise _Bad(f"corrupt image {what}: {type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------- column types

def _check_types(source: Source, schema: Schema, path: Path) -> None:
    """Each used column's Arrow type, once for the whole column (ValueError naming it)."""
    import pyarrow as pa

    arrow = source.table.schema

    def is_text(t) -> bool:  # a Json column (mixed types) is checked row by row
        return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
                or isinstance(t, pa.ExtensionType))

    def is_image(t) -> bool:
        if is_text(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return True
        return pa.types.is_struct(t) and bool({t.field(i).name for i in range(t.num_fields)} & {"bytes", "path"})

    def is_list(t) -> bool:
        return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)

    image_type = arrow.field(schema.images).type
    if not (is_image(image_type) or is_list(image_type) and is_image(image_type.value_type)):
        raise ValueError(f"--data {path}: column {schema.images!r} is {image_type}, expected an image or a list "
                         "of images (a path string, bytes, or an {bytes, path} struct)")
    prompt_type = arrow.field(schema.prompt).type
    if not (is_text(prompt_type) or is_list(prompt_type)):
        raise ValueError(f"--data {path}: column {schema.prompt!r} is {prompt_type}, expected a string or a "
                         "conversation (a list of messages)")
    for key in (schema.solution, schema.answer):
        if key is None:
            continue
        t = arrow.field(key).type
        if not (is_text(t) or pa.types.is_integer(t) or pa.types.is_floating(t)):
            raise ValueError(f"--data {path}: column {key!r} is {t}, expected a string")
