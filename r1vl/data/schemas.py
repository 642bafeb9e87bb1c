"""Which columns of a dataset hold the prompt, the images and the reference, and one row made
into an Example.

Recognised from the column names (each overridable: --prompt_key, --image_key,
--solution_key, --answer_key):

    R1-VL   image_path, problem, solution ("### The final answer is:" header), key_steps
    EasyR1  problem (with <image> tags), answer, images
    R1-V    image, problem, solution ("<answer> ... </answer>")
    TRL     prompt (a conversation with {"type": "image"} parts), image or images, any others

The reference the rewards check (Example.solution) is the solution column when it has R1-VL's
header (the reasoning the warm-up trains on, its final answer checked by StepRAR); R1-V's
"<answer>x</answer>" solution is its inner x; otherwise the answer column, else the solution
column as it stands. A record with only a final answer has no key steps: StepRAR scores it
with the answer check alone, plus StepRVR (docs/data.md).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from r1vl.data.records import Example, _Bad, _key_steps

IMAGE_TAG = "<image>"
_HEADER = "### The final answer is:"
_ANSWER_TAGS = re.compile(r"^\s*<answer>(.*?)</answer>\s*$", re.DOTALL)
_PROMPTS = ("prompt", "problem", "question")
_IMAGES = ("images", "image", "image_path")
_VIDEOS = ("video", "videos")


@dataclass(frozen=True)
class Schema:
    """The columns an Example is made from; None = the dataset has none."""

    prompt: str
    images: str
    solution: str | None
    answer: str | None
    key_steps: str | None

    def describe(self) -> str:
        used = [("prompt", self.prompt), ("images", self.images), ("solution", self.solution),
                ("answer", self.answer), ("key_steps", self.key_steps)]
        return ", ".join(f"{role}={name!r}" for role, name in used if name)


def detect_schema(columns: list[str], *, prompt_key: str = "", image_key: str = "", solution_key: str = "",
                  answer_key: str = "", where: str = "--data") -> Schema:
    """The Schema of a dataset with these columns; a key given overrides the guess.

    Raises:
        ValueError: a key names no column, a prompt or image column cannot be found, or the
            dataset has videos (not supported); the message lists the columns.
    """
    have = set(columns)
    listed = ", ".join(repr(c) for c in columns)
    for option, key in (("prompt_key", prompt_key), ("image_key", image_key), ("solution_key", solution_key),
                        ("answer_key", answer_key)):
        if key and key not in have:
            raise ValueError(f"{where}: --{option} {key!r} is not a column (columns: {listed})")
    videos = [c for c in _VIDEOS if c in have]
    if videos:
        raise ValueError(f"{where}: column {videos[0]!r}: videos are not supported, only images")

    def pick(key: str, names: tuple[str, ...], role: str, option: str) -> str:
        if key:
            return key
        found = next((n for n in names if n in have), None)
        if found is None:
            raise ValueError(f"{where}: no {role} column (looked for {', '.join(map(repr, names))}; columns: "
                             f"{listed}); name it with --{option}")
        return found

    return Schema(
        prompt=pick(prompt_key, _PROMPTS, "prompt", "prompt_key"),
        images=pick(image_key, _IMAGES, "image", "image_key"),
        solution=solution_key or ("solution" if "solution" in have else None),
        answer=answer_key or ("answer" if "answer" in have else None),
        key_steps="key_steps" if "key_steps" in have else None,
    )


# --------------------------------------------------------------------------- one row

def image_values(value) -> list:
    """The images of a row's image cell, as stored: one value or a list of them."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def resolve_image(value, root: Path):
    """One stored image as Example.images holds it: a Path (relative ones under `root`), raw
    bytes, or a PIL image. HF Image structs give their bytes, else their path."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
        if not value:
            raise _Bad("an image struct with neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        if not value:
            raise _Bad("an empty image (0 bytes)")
        return bytes(value)
    if isinstance(value, (str, Path)):
        if not str(value):
            raise _Bad("an empty image path")
        return root / value  # an absolute value stays itself
    if hasattr(value, "mode") and hasattr(value, "size"):  # a PIL image (a decoded Image feature)
        return value
    raise _Bad(f"an image must be a path, bytes, an {{'bytes', 'path'}} struct or a PIL image, "
               f"got {type(value).__name__}")


def _text(row: dict, key: str, role: str) -> str:
    value = row.get(key)
    if value is None:
        raise _Bad(f"missing {role} (column {key!r} is empty)")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _Bad(f"column {key!r} must be a string, got {type(value).__name__}")
    return value if isinstance(value, str) else str(value)


def _messages(value) -> tuple[tuple[dict, ...], int]:
    """A conversational prompt (TRL) as Example.messages, and its number of image parts."""
    from r1vl.data.records import _ROLES, _content_parts

    if not isinstance(value, list) or not value:
        raise _Bad("a conversational prompt must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise _Bad(f"prompt[{i}] must be an object with role in {_ROLES}")
        content = message.get("content")
        if isinstance(content, list):
            if any(isinstance(p, dict) and p.get("type") == "video" for p in content):
                raise _Bad("videos are not supported, only images")
            # Arrow gives every part every key of the column's struct: drop the empty ones.
            content = [{k: v for k, v in p.items() if v is not None} if isinstance(p, dict) else p for p in content]
        parts = _content_parts(content, i)
        for part in parts:
            part.pop("image", None)  # the image column holds the images, in part order
        messages.append({"role": message["role"], "content": parts})
    n_images = sum(p["type"] == "image" for m in messages for p in m["content"])
    return tuple(messages), n_images


def _reference(row: dict, schema: Schema) -> str:
    """Example.solution: see the module docstring."""
    solution = _text(row, schema.solution, "solution") if schema.solution and row.get(schema.solution) is not None \
        else None
    if solution is not None:
        if _HEADER in solution:
            return solution
        tagged = _ANSWER_TAGS.match(solution)
        if tagged:
            return tagged.group(1).strip()
    if schema.answer and row.get(schema.answer) is not None:
        return _text(row, schema.answer, "answer")
    if solution is not None:
        return solution
    raise _Bad("no reference: " + " and ".join(f"column {k!r} is empty" for k in (schema.solution, schema.answer) if k)
               if schema.solution or schema.answer else "no reference (no solution or answer column)")


def row_example(row: dict, schema: Schema, root: Path, source: str, max_images: int) -> Example:
    """One record as an Example; images resolved, not opened.

    Raises:
        _Bad: a missing or mistyped value, no image, more than max_images images (0 = no cap),
            or "<image>" tags / image parts that do not match the images in number.
    """
    images = tuple(resolve_image(v, root) for v in image_values(row.get(schema.images)))
    prompt = row.get(schema.prompt)
    if isinstance(prompt, list):
        messages, n_tags = _messages(prompt)
        problem = "".join(p["text"] for m in messages if m["role"] == "user" for p in m["content"]
                          if p["type"] == "text")
        what = "image parts in the prompt"
    else:
        messages, problem = None, _text(row, schema.prompt, "prompt")
        n_tags, what = problem.count(IMAGE_TAG), f"{IMAGE_TAG} tags in {schema.prompt!r}"
    if not images:
        raise _Bad(f"no image (column {schema.images!r} is empty)")
    if max_images and len(images) > max_images:
        raise _Bad(f"{len(images)} images, more than --max_images {max_images}")
    if (n_tags or messages is not None) and n_tags != len(images):
        raise _Bad(f"{n_tags} {what} but {len(images)} image(s) in {schema.images!r}")
    key_steps = _key_steps({"key_steps": row.get(schema.key_steps)}) if schema.key_steps else ()
    first = images[0] if isinstance(images[0], Path) else None
    return Example(image_path=first, problem=problem, solution=_reference(row, schema), key_steps=key_steps,
                   source=source, images=images if len(images) > 1 or first is None else (), messages=messages,
                   columns=row)
