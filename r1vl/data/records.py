"""Training data: R1-VL-10K style RL records, Mulberry-style SFT records, and their images.

RL record (JSON list or JSONL, one object per record)::

    {"image_path": "images/0001.png",          # relative to the image root
     "problem": "How many red shapes ...?",
     "solution": "### Image Description: ... ### The final answer is:\\n3",
     "key_steps": {"Steps": ["3 red", ["12/2=6", "\\\\frac{12}{2}=6"]]}}   # optional

SFT record, chat form (LLaMA-Factory / Mulberry): string contents with one "<image>"
placeholder per entry of "images", or content lists with {"type": "image", "image": path}::

    {"messages": [{"role": "user", "content": "<image>How many ...?"},
                  {"role": "assistant", "content": "### Image Description: ..."}],
     "images": ["images/0001.png"]}

Bad records (unreadable line, missing or mistyped field, missing or corrupt image) raise
BadRecordError naming the file, the record index and the reason; with
`skip_bad_records=True` they are skipped and listed in `Loaded.bad` (and logged as one
warning), never dropped silently.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import torch

logger = logging.getLogger(__name__)

# Qwen2-VL's image processor defaults: 14-pixel patches merged 2x2, so sides are multiples
# of 28; at least 4 merged tokens, at most 16384 (transformers' qwen2_vl smart_resize).
PATCH_FACTOR = 28
MIN_PIXELS = 56 * 56
MAX_PIXELS = 14 * 14 * 4 * 1280
_ROLES = ("system", "user", "assistant")
_IMAGE_TAG = "<image>"


# --------------------------------------------------------------------------- records

@dataclass(frozen=True)
class Example:
    """One RL prompt: its images, a question, a reference solution and its key steps.

    R1-VL's records fill the first five fields; the other schemas (r1vl.data.schemas) also
    fill `images` (several, or not files), `messages` (a conversational prompt) and `columns`.
    """

    image_path: Path | None  # the first image when it is a file (R1-VL: image_root / image_path)
    problem: str  # the question text (a conversational prompt: its text parts, joined)
    # The reference: R1-VL's reasoning ending "### The final answer is:\n<answer>", or just
    # the final answer (r1vl.rewards.rules.reference_answer takes a solution without the
    # header as the answer itself); "" when the record has none (eval prompts).
    solution: str
    key_steps: tuple[tuple[str, ...], ...] = ()  # each entry: equivalent alternatives; () = none
    source: str = ""  # "<file>:<record index>", for error messages and logs
    # Every image in prompt order: a Path, raw encoded bytes or a PIL image (load_image opens
    # each); () means (image_path,).
    images: tuple = ()
    # A conversational prompt (TRL): ({"role", "content": [{"type": "image"} | {"type": "text",
    # "text"}]}, ...), its image parts in the order of `images`; None = one user turn from
    # `problem` (its "<image>" tags, if any, place the images).
    messages: tuple | None = None
    # Every column of the record as stored (images as stored, not decoded): what user reward
    # functions receive. Not compared: two Examples are equal when they train alike.
    columns: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.images and self.image_path is not None:
            object.__setattr__(self, "images", (self.image_path,))

    def pil_images(self) -> list:
        """The images as RGB PIL images, as stored (not resized): what reward functions get."""
        return [load_image(image) for image in self.images]


@dataclass(frozen=True)
class SFTExample:
    """One SFT conversation. Text and image parts in order; images resolved to paths."""

    messages: tuple[dict, ...]  # {"role": str, "content": [{"type": "image"} | {"type": "text", "text": str}]}
    image_paths: tuple[Path, ...]  # one per {"type": "image"} part, in order of appearance
    source: str = ""


@dataclass(frozen=True)
class BadRecord:
    path: str
    index: int  # 0-based record index in the file (for JSONL: among its non-blank lines)
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: record {self.index}: {self.reason}"


class BadRecordError(ValueError):
    """A record that cannot be used; the message names the file, record index and reason."""

    def __init__(self, bad: BadRecord) -> None:
        super().__init__(str(bad))
        self.bad = bad


T = TypeVar("T")


@dataclass
class Loaded(Generic[T]):
    """The usable records of a file and the ones skipped (with skip_bad_records=True)."""

    path: Path
    items: list[T] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.path}: loaded {len(self.items)} records, skipped {len(self.bad)}"
        return text + "".join(f"\n  {b}" for b in self.bad)


class _Bad(Exception):
    """Internal: raised by the record parsers with a reason; turned into a BadRecord."""


# --------------------------------------------------------------------------- reading files

def read_records(path: str | Path) -> Iterator[tuple[int, dict | BadRecord]]:
    """Yield (index, record) from a JSON list or a JSONL file.

    The format is told by the first non-blank character ('[' = JSON list). A JSONL line
    that is not a JSON object is yielded as a BadRecord (so one bad line does not cost the
    file); a JSON list that does not parse makes the whole file unreadable (ValueError).
    """
    path = Path(path)
    if _is_json_list(path):
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        for i, record in enumerate(records):
            if isinstance(record, dict):
                yield i, record
            else:
                yield i, BadRecord(str(path), i, f"expected a JSON object, got {type(record).__name__}")
        return
    index = 0
    with path.open("rb") as f:  # line by line (SFT files are large), decoded per line
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
                yield index, record
            except ValueError as e:
                yield index, BadRecord(str(path), index, f"line {line_no} unreadable: {e}")
            index += 1


def _is_json_list(path: Path) -> bool:
    """Whether the file's first non-blank character is '['."""
    with path.open("rb") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1] == b"["
    return False


def _load(path, parse, skip_bad_records: bool) -> Loaded:
    path = Path(path)
    loaded = Loaded(path)
    for index, record in read_records(path):
        if not isinstance(record, BadRecord):
            try:
                loaded.items.append(parse(record, f"{path}:{index}"))
                continue
            except _Bad as e:
                record = BadRecord(str(path), index, str(e))
        if not skip_bad_records:
            raise BadRecordError(record)
        loaded.bad.append(record)
    if loaded.bad:
        logger.warning("%s", loaded.summary())
    return loaded


def _field(record: dict, name: str, kind: type = str):
    if name not in record:
        raise _Bad(f"missing field {name!r}")
    value = record[name]
    if not isinstance(value, kind):
        raise _Bad(f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _image(root: Path, relative: str, check: bool) -> Path:
    """The resolved image path; with `check`, the file must exist and decode as an image."""
    path = root / relative
    if not check:
        return path
    if not path.is_file():
        raise _Bad(f"image not found: {path}")
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()  # reads the whole file and checks its structure, without decoding
    except Exception as e:  # noqa: BLE001 - pillow raises many types for bad files
        raise _Bad(f"corrupt image {path}: {type(e).__name__}: {e}") from None
    return path


def _key_steps(record: dict) -> tuple[tuple[str, ...], ...]:
    value = record.get("key_steps")
    if value is None:
        return ()
    if not isinstance(value, dict) or not isinstance(value.get("Steps"), list):
        raise _Bad('field "key_steps" must be {"Steps": [str | [str, ...], ...]}')
    entries = []
    for j, entry in enumerate(value["Steps"]):
        alternatives = [entry] if isinstance(entry, str) else entry
        if (not isinstance(alternatives, list) or not alternatives
                or not all(isinstance(a, str) and a.strip() for a in alternatives)):
            raise _Bad(f"key_steps.Steps[{j}] must be a non-empty string or a non-empty "
                       f"list of non-empty strings, got {entry!r}")
        entries.append(tuple(alternatives))
    return tuple(entries)


# --------------------------------------------------------------------------- RL examples

def load_examples(path: str | Path, image_root: str | Path | None = None, *,
                  skip_bad_records: bool = False, check_images: bool = True) -> Loaded[Example]:
    """Load R1-VL-10K style records (see the module docstring).

    Args:
        path: a JSON list or JSONL file.
        image_root: the directory `image_path` is relative to; the data file's directory
            when None.
        skip_bad_records: skip and report bad records instead of raising.
        check_images: open every image at load time so that a missing or corrupt file
            fails here, with its record index, rather than in the middle of training.

    Raises:
        BadRecordError: a bad record, unless skip_bad_records.
    """
    root = Path(image_root) if image_root is not None else Path(path).parent

    def parse(record: dict, source: str) -> Example:
        return Example(
            image_path=_image(root, _field(record, "image_path"), check_images),
            problem=_field(record, "problem"),
            solution=_field(record, "solution"),
            key_steps=_key_steps(record),
            source=source,
        )

    return _load(path, parse, skip_bad_records)


# --------------------------------------------------------------------------- SFT examples

def _content_parts(content, message_index: int) -> list[dict]:
    """Content as a list of {"type": "image", ["image": path]} / {"type": "text", "text": s}."""
    if isinstance(content, str):
        parts = []
        for j, text in enumerate(content.split(_IMAGE_TAG)):
            if j:
                parts.append({"type": "image"})
            if text:
                parts.append({"type": "text", "text": text})
        return parts
    if not isinstance(content, list):
        raise _Bad(f"messages[{message_index}].content must be a string or a list")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            parts.append({"type": "image", **({"image": part["image"]} if "image" in part else {})})
        else:
            raise _Bad(f"messages[{message_index}].content has an unknown part {part!r}")
    return parts


def load_sft(path: str | Path, image_root: str | Path | None = None, *,
             skip_bad_records: bool = False, check_images: bool = True) -> Loaded[SFTExample]:
    """Load chat-form SFT records (see the module docstring); arguments as `load_examples`.

    Image references come from "images" (in the order of the image parts) or from the
    parts themselves ({"type": "image", "image": path}), not both. Every conversation needs
    at least one assistant turn.
    """
    root = Path(image_root) if image_root is not None else Path(path).parent

    def parse(record: dict, source: str) -> SFTExample:
        raw = _field(record, "messages", list)
        listed = record.get("images", [])
        if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
            raise _Bad('field "images" must be a list of strings')
        messages, inline = [], []
        for i, message in enumerate(raw):
            if not isinstance(message, dict) or message.get("role") not in _ROLES:
                raise _Bad(f"messages[{i}] must be an object with role in {_ROLES}")
            if "content" not in message:
                raise _Bad(f"messages[{i}] has no content")
            parts = _content_parts(message["content"], i)
            inline += [p.pop("image") for p in parts if p["type"] == "image" and "image" in p]
            messages.append({"role": message["role"], "content": parts})
        if not any(m["role"] == "assistant" for m in messages):
            raise _Bad("no assistant message")
        n_parts = sum(p["type"] == "image" for m in messages for p in m["content"])
        if inline and listed:
            raise _Bad('images given both in "images" and inside the messages')
        refs = inline or listed
        if len(refs) != n_parts:
            raise _Bad(f"{n_parts} image placeholders but {len(refs)} image paths")
        return SFTExample(
            messages=tuple(messages),
            image_paths=tuple(_image(root, r, check_images) for r in refs),
            source=source,
        )

    return _load(path, parse, skip_bad_records)


# --------------------------------------------------------------------------- images

def smart_resize(height: int, width: int, factor: int = PATCH_FACTOR,
                 min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) as Qwen2-VL's processor resizes to: both multiples of `factor`,
    min_pixels <= h*w <= max_pixels, aspect ratio kept as closely as possible.

    The same rule as transformers' qwen2_vl `smart_resize` (tested against it); written out
    here because importing that module pulls in torch and takes seconds.
    """
    if min(height, width) <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be at most 200, got {height}x{width}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def load_image(path, max_pixels: int | None = None, min_pixels: int = MIN_PIXELS,
               factor: int = PATCH_FACTOR):
    """Open an image as RGB (a PIL.Image): `path` is a file (str or Path), encoded bytes, an
    HF Image struct {"bytes", "path"} or a PIL image. With max_pixels, resize it (bicubic, as the
    processor does) to `smart_resize`'s size for sides that are multiples of `factor` (patch
    x merge: 28 for Qwen2-VL, 32 for Qwen3-VL), so the processor will not resize it again.

    Raises:
        ValueError: the file cannot be read as an image (the message names it).
    """
    import io

    from PIL import Image

    if isinstance(path, dict):  # an HF Image struct: its bytes when it has them, else its file
        path = path.get("bytes") or path.get("path")
    try:
        if isinstance(path, Image.Image):
            opened = contextlib.nullcontext(path)  # the caller's image: converted, never closed
        else:
            opened = Image.open(io.BytesIO(path) if isinstance(path, (bytes, bytearray)) else path)
        with opened as im:
            if im.mode in ("RGBA", "LA") or "transparency" in im.info:
                # Transparent pixels become white, as transformers' convert_to_rgb does;
                # a plain convert("RGB") would keep whatever colour hides under alpha 0.
                rgba = im.convert("RGBA")
                image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(image, rgba).convert("RGB")
            else:
                image = im.convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read image {_describe(path)}: {type(e).__name__}: {e}") from None
    if max_pixels is not None:
        h, w = smart_resize(image.height, image.width, factor, min_pixels=min_pixels, max_pixels=max_pixels)
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h), Image.Resampling.BICUBIC)
    return image


def _describe(image) -> str:
    """An image for a message: its path, else what it is."""
    if isinstance(image, (bytes, bytearray)):
        return f"({len(image)} bytes)"
    return str(image) if isinstance(image, (str, Path)) else f"({type(image).__name__})"


def rank_batches(items: list, per_rank: int, rank: int, world_size: int, seed: int, skip: int = 0):
    """Endless per-rank batches: each epoch a seeded permutation of `items`, cut into global
    batches of per_rank * world_size; rank r takes its own slice, so ranks see different items.
    The first `skip` batches are passed over (a resumed run's data position)."""
    if len(items) < per_rank * world_size:
        raise ValueError(f"{len(items)} examples cannot fill one global batch of {per_rank} x {world_size} ranks")
    generator, step = torch.Generator().manual_seed(seed), per_rank * world_size
    while True:
        order = torch.randperm(len(items), generator=generator).tolist()
        for start in range(0, len(order) - step + 1, step):
            if skip > 0:
                skip -= 1
                continue
            mine = order[start + rank * per_rank: start + (rank + 1) * per_rank]
            yield [items[i] for i in mine]
