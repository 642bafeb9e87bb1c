"""--data as an Arrow table: JSON/JSONL, Parquet, a `datasets` save_to_disk directory, or a
directory of Parquet/JSONL shards, all read through the `datasets` library.

The table stays in Arrow memory: memory-mapped from disk for save_to_disk directories (no
copy) and for files `load_dataset` converts (into its Arrow cache: HF_DATASETS_CACHE, by
default under ~/.cache/huggingface/datasets). Rows become Python objects one at a time
(r1vl.data.table), so a 260k-row dataset never sits in RAM as Python objects.

JSON/JSONL that Arrow cannot type (a column mixing strings and lists, as R1-VL-10K's
`key_steps` entries do, or an unreadable line) is read record by record instead: such files
are the paper's 10k-record kind, small enough to hold as Python dicts.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

logger = logging.getLogger(__name__)

_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}


@dataclass
class Source:
    """The records of --data: an Arrow table (`table`), or Python dicts (`records`, the JSON
    fallback, with the reader's unreadable lines as BadRecords)."""

    path: Path
    columns: list[str]
    table: pa.Table | None = None  # (rows, columns) as stored
    records: list | None = None  # dict | BadRecord per record, when Arrow could not type the file
    how: str = ""  # how it was read, for the start-up line
    features: object = None  # the table's datasets.Features, Image features made not to decode

    def __len__(self) -> int:
        return self.table.num_rows if self.table is not None else len(self.records)

    def decode(self, row: dict) -> dict:
        """A row of `table` as Python values the way `datasets` gives them (Json columns
        parsed), images left as stored ({"bytes", "path"} structs: decoded when used)."""
        return self.features.decode_example(row) if self.features is not None else row


def data_files(path: Path) -> tuple[str, list[str]]:
    """(builder, files) of a data file or a directory of shards of one kind."""
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"--data {path}: unknown file type {path.suffix!r} (expected .json, .jsonl or .parquet)")
        return builder, [str(path)]
    shards = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _BUILDERS)
    kinds = {_BUILDERS[p.suffix.lower()] for p in shards}
    if not shards:
        raise ValueError(f"--data {path}: a directory with neither a `datasets` save_to_disk layout "
                         "(dataset_info.json, state.json) nor .parquet/.json/.jsonl shards")
    if len(kinds) > 1:
        raise ValueError(f"--data {path}: shards of several kinds ({', '.join(sorted(kinds))}); keep one kind")
    return kinds.pop(), [str(p) for p in shards]


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file()


def open_source(path: str | Path) -> Source:
    """The records of --data PATH (see the module docstring).

    Raises:
        ValueError: no such path, an unknown layout, a DatasetDict with several splits, or a
            file `datasets` cannot read (the message names it).
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--data {path}: no such file or directory")
    import datasets

    datasets.disable_progress_bars()
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if _is_saved_dataset(p))
        split = "train" if "train" in splits else splits[0] if len(splits) == 1 else None
        if split is None:
            raise ValueError(f"--data {path}: a DatasetDict with splits {splits} and none named train; pass one "
                             f"split's directory (e.g. {path / splits[0]})" if splits
                             else f"--data {path}: a DatasetDict without splits")
        return _from_dataset(path, datasets.load_from_disk(str(path / split)),
                             f"save_to_disk, split {split}, memory-mapped")
    if _is_saved_dataset(path):
        return _from_dataset(path, datasets.load_from_disk(str(path)), "save_to_disk, memory-mapped")
    builder, files = data_files(path)
    cache_dir = os.environ.get("HF_DATASETS_CACHE") or None  # read here: datasets reads it once, at import
    try:
        dataset = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - pyarrow and datasets raise many types for one bad file
        if builder == "json" and len(files) == 1:
            return _from_records(path, e)
        raise ValueError(f"--data {path}: datasets cannot read it as {builder}: {type(e).__name__}: "
                         f"{_first_line(e)}") from None
    return _from_dataset(path, dataset, f"{builder} via datasets, Arrow cache memory-mapped")


def _from_dataset(path: Path, dataset, how: str) -> Source:
    if dataset._indices is not None:  # a selection saved without flatten_indices: rows in order
        dataset = dataset.flatten_indices()
    return Source(path, list(dataset.column_names), table=dataset.data.table, how=how,
                  features=_undecoded(dataset.features))


def _undecoded(features):
    """A copy of `features` whose Image features do not decode (they give {"bytes", "path"})."""
    import copy

    import datasets

    def walk(feature):
        if isinstance(feature, datasets.Image):
            feature.decode = False
        elif isinstance(feature, dict):
            for value in feature.values():
                walk(value)
        elif isinstance(feature, (list, tuple)):
            for value in feature:
                walk(value)
        elif hasattr(feature, "feature"):  # List, Sequence, LargeList
            walk(feature.feature)

    features = copy.deepcopy(features)
    for value in features.values():
        walk(value)
    return datasets.Features(features)  # rebuilt: which columns need decoding is worked out here


def _from_records(path: Path, error: Exception) -> Source:
    """The JSON fallback: records read one by one (r1vl.data.records.read_records)."""
    from r1vl.data.records import BadRecord, read_records

    records = [record for _, record in read_records(path)]
    columns: dict[str, None] = {}
    for record in records:
        if not isinstance(record, BadRecord):
            columns.update(dict.fromkeys(record))
    logger.info("%s: read record by record (Arrow cannot type it: %s)", path, _first_line(error))
    return Source(path, list(columns), records=records, how="JSON, record by record (mixed types)")


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
