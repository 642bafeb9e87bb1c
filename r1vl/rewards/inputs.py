"""What a user's reward function receives: TRL's GRPOTrainer arguments, built from a step's rollout.

    kwargs, sources = reward_inputs(rollout, step=7, num_steps=500)
    fn(**kwargs)   # fn(prompts, completions, completion_ids, **columns)

As TRL passes them for vision-language (conversational) data, one entry per completion, the
completions of a prompt consecutive (entry p*G + g is completion g of prompt p):
  prompts         the prompt as chat messages with the images in it:
                  [{"role": "user", "content": [{"type": "image", "image": <PIL.Image>},
                                                {"type": "text", "text": problem}]}]
                  (a record's own conversational `prompt` column, its image placeholders filled);
  completions     [{"role": "assistant", "content": text}], the decoded completion;
  completion_ids  its token ids, a list of int;
  **columns       every column of the record but `prompt`: today's Example fields (problem,
                  solution, key_steps, image_path) and any extra column a record carries
                  (Example.columns, when the records have one), with the images as PIL images
                  (RGB, at the size stored): `images`, a list per record, and `image`, the one
                  image, when the record has exactly one;
  trainer_state   an object with global_step (GRPO steps done before this one) and max_steps;
  log_extra, log_metric   accepted, not recorded (r1vl keeps no completions table).

A record's values are the same objects in its G entries, so the pipe to the worker carries
each image once per prompt.
"""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from types import SimpleNamespace

from r1vl.data.records import load_image

_NOT_COLUMNS = ("source", "columns", "prompt", "messages")  # bookkeeping; the prompt goes in `prompts`


def reward_inputs(rollout, step: int, num_steps: int) -> tuple[dict, list[str]]:
    """(kwargs for fn(**kwargs), each prompt's record "<file>:<index>").

    rollout: r1vl.sampling.sampler.Rollout. step: the GRPO step being scored (1-based).
    """
    G, P = rollout.group_size, len(rollout.prompts)
    per_prompt = [example_columns(p.example) for p in rollout.prompts]
    prompts = [prompt_messages(p.example, columns.get("images", [])) for p, columns in zip(rollout.prompts, per_prompt)]
    names = list(dict.fromkeys(k for columns in per_prompt for k in columns))
    kwargs = {
        "prompts": [prompts[i // G] for i in range(P * G)],
        "completions": [[{"role": "assistant", "content": text}] for text in rollout.texts],
        "completion_ids": [ids.tolist() for ids in rollout.completions.ids],
        **{name: [per_prompt[i // G].get(name) for i in range(P * G)] for name in names},
        "trainer_state": SimpleNamespace(global_step=step - 1, max_steps=num_steps),
    }
    return kwargs, [p.example.source for p in rollout.prompts]


def example_columns(example) -> dict:
    """Every column of one record, the images as PIL images (see the module docstring)."""
    columns = dict(getattr(example, "columns", None) or {})
    for field in dataclasses.fields(example):
        if field.name not in _NOT_COLUMNS:
            columns[field.name] = _plain(getattr(example, field.name))
    columns.pop("prompt", None)
    images = _images(example)
    columns["images"] = images
    if len(images) == 1:
        columns["image"] = images[0]
    return columns


def _images(example) -> list:
    """The record's images as PIL images, from whichever field holds them: `images` (PIL
    images, paths, bytes or HF Image structs), `image_paths` or `image_path`."""
    held = getattr(example, "images", None) or getattr(example, "image_paths", None) or (
        [example.image_path] if getattr(example, "image_path", None) else [])
    return [_image(item) for item in held]


def _image(item):
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    if isinstance(item, dict):  # a `datasets` Image struct {"bytes": ..., "path": ...}
        item = item.get("bytes") or item.get("path")
    if isinstance(item, (bytes, bytearray)):
        return load_image(io.BytesIO(item))
    return load_image(item)


def _plain(value):
    """Paths as str, tuples as lists: what a JSON record would have held."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def prompt_messages(example, images: list) -> list[dict]:
    """The prompt as TRL's multimodal chat messages: every content a list of parts, the images
    in the image parts. A record's own `prompt` messages are kept, their empty image
    placeholders filled in order (or the images put before the first user turn's text when it
    has none); otherwise one user turn of the images and the problem."""
    prompt = (getattr(example, "columns", None) or {}).get("prompt")
    if not isinstance(prompt, list):
        prompt = [{"role": "user", "content": example.problem}]
    remaining = list(images)
    placeholders = sum(isinstance(m.get("content"), list) and
                       sum(p.get("type") == "image" and "image" not in p for p in m["content"]) for m in prompt)
    messages, placed = [], bool(placeholders)
    for message in prompt:
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
            if message["role"] == "user" and not placed:
                content = [{"type": "image", "image": image} for image in remaining] + content
                remaining, placed = [], True
        elif isinstance(content, list):
            content = [({**part, "image": remaining.pop(0)} if part.get("type") == "image" and "image" not in part
                        and remaining else part) for part in content]
        messages.append({**message, "content": content})
    return messages
