"""A synthetic visual-reasoning task small enough for a tiny model to learn on a CPU.

Records are drawn with pillow on a small white canvas (56x56 by default, so a Qwen2-VL
vision tower sees 4x4 patches of 14 pixels, 2x2 tokens after merging). The default tasks
(TASKS), each answerable only by looking at the picture:

- "colour": one large red, blue or green circle or square; "What colour is the shape?"
- "bars": two bars with heights in whole units (ticks every unit); "Which bar is taller?"
- "count": 2 to 4 shapes on a 2x2 grid, one per quadrant (at 56 pixels, one per merged
  vision token); "How many red shapes?"

and one more, chosen with tasks=("add",) or --tasks add:

- "add": two seven-segment digits side by side; "What is the sum of the two digits?"

Answers are a small integer or one word. Solutions follow docs/method.md's output format
exactly, and every key step is a substring of the solution's step bodies, so each
reference solution scores the maximal reward (2.1) against its own record.

Deterministic by seed: record i depends only on (seed, i), and the PNG bytes only on the
pixels. `write_dataset` writes images/NNNNN.png and data.jsonl, which r1vl.data.records reads like
any other data file. Run `python -m r1vl.data.synthetic OUT_DIR --n 512` to make one.
"""
from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

TASKS = ("colour", "bars", "count")
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (20, 150, 40)}
CELL = 14  # the vision patch: image sides are whole patches
BAR_UNIT = 7  # pixels per unit of bar height
# Seven-segment digits: segments a (top), b (top right), c (bottom right), d (bottom),
# e (bottom left), f (top left), g (middle).
_SEGMENTS = {0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd",
             6: "afgedc", 7: "abc", 8: "abcdefg", 9: "abcdfg"}


def _solution(description: str, rationale: str, steps: Sequence[str], answer: str) -> str:
    lines = ["### Image Description:", description, "### Rationales:", rationale,
             "### Let's think step by step."]
    for i, step in enumerate(steps, start=1):
        lines += [f"### Step {i}:", step]
    lines += ["### The final answer is:", answer]
    return "\n".join(lines)


def _record(task: str, problem: str, description: str, rationale: str, steps: Sequence[str],
            answer: str, key_steps: list) -> dict:
    return {"task": task, "problem": problem,
            "solution": _solution(description, rationale, steps, answer),
            "key_steps": {"Steps": key_steps}}


# --------------------------------------------------------------------------- the tasks

def _count(rng: random.Random, size: int) -> tuple[Image.Image, dict]:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    cell = size // 2  # one shape per quadrant: per merged vision token at 56 pixels
    margin = cell // 6
    cells = rng.sample(range(4), rng.randint(2, 4))
    colours = [rng.choice(list(COLOURS)) for _ in cells]
    target = rng.choice(colours)  # at least one shape of the asked colour
    kinds = []
    for index, colour in zip(cells, colours):
        x, y = (index % 2) * cell + margin, (index // 2) * cell + margin
        box = (x, y, x + cell - 1 - 2 * margin, y + cell - 1 - 2 * margin)
        kind = rng.choice(("circle", "square"))
        (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        kinds.append(kind)
    n = colours.count(target)
    tally = [f"{colours.count(c)} {c}" for c in COLOURS if colours.count(c)]
    listed = ", ".join(k for k, c in zip(kinds, colours) if c == target)
    noun = "shape" if n == 1 else "shapes"
    return image, _record(
        "count",
        f"How many {target} shapes are in the image? Answer with a number.",
        f"The image shows {len(cells)} shapes: " + ", ".join(tally) + ".",
        f"The question asks for the number of {target} shapes, so count only the shapes of that colour.",
        [f"The {target} {noun}: {listed}.", f"Counting them gives {n} {target} {noun}."],
        str(n),
        [f"{target} {noun}", f"{n} {target}"],
    )


def _bars(rng: random.Random, size: int) -> tuple[Image.Image, dict]:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    top = size // BAR_UNIT - 1
    left, right = rng.sample(range(1, top + 1), 2)
    for y in range(size - 1, 0, -BAR_UNIT):  # unit ticks on the left edge
        draw.line((0, y, 2, y), fill="black")
    for i, (height, colour) in enumerate(((left, "blue"), (right, "red"))):
        x0 = size // 4 + i * size // 2 - size // 8
        draw.rectangle((x0, size - 1 - height * BAR_UNIT, x0 + size // 4 - 1, size - 1),
                       fill=COLOURS[colour])
    taller, rel = ("left", ">") if left > right else ("right", "<")
    return image, _record(
        "bars",
        "Which bar is taller, the left one or the right one? Answer with left or right.",
        f"The image shows two bars: a blue bar on the left, {left} units tall, and a red bar "
        f"on the right, {right} units tall.",
        "The taller bar is the one with the larger height, so compare the two heights.",
        [f"The left bar is {left} units tall and the right bar is {right} units tall.",
         f"{left} {rel} {right}, so the {taller} bar is taller."],
        taller,
        [f"left bar is {left} units", f"right bar is {right} units",
         [f"{left} {rel} {right}", f"{left}{rel}{right}"], f"{taller} bar is taller"],
    )


def _digit(draw: ImageDraw.ImageDraw, digit: int, x0: int, y0: int, w: int, h: int) -> None:
    t = max(2, w // 6)  # stroke width
    mid = y0 + h // 2
    boxes = {"a": (x0, y0, x0 + w, y0 + t), "g": (x0, mid - t // 2, x0 + w, mid + t - t // 2),
             "d": (x0, y0 + h - t, x0 + w, y0 + h), "f": (x0, y0, x0 + t, mid),
             "b": (x0 + w - t, y0, x0 + w, mid), "e": (x0, mid, x0 + t, y0 + h),
             "c": (x0 + w - t, mid, x0 + w, y0 + h)}
    for segment in _SEGMENTS[digit]:
        draw.rectangle(boxes[segment], fill="black")


def _add(rng: random.Random, size: int) -> tuple[Image.Image, dict]:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    a, b = rng.randrange(10), rng.randrange(10)
    half, margin = size // 2, size // 8
    for i, d in enumerate((a, b)):
        _digit(draw, d, i * half + margin, margin, half - 2 * margin, size - 2 * margin)
    s = a + b
    return image, _record(
        "add",
        "What is the sum of the two digits shown in the image? Answer with a number.",
        f"The image shows two digits: {a} on the left and {b} on the right.",
        "The question asks for the sum of the two digits, so add them.",
        [f"The digits are {a} and {b}.", f"{a} + {b} = {s}."],
        str(s),
        [f"{a} and {b}", [f"{a} + {b} = {s}", f"{a}+{b}={s}"]],
    )


def _colour(rng: random.Random, size: int) -> tuple[Image.Image, dict]:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    colour, kind = rng.choice(list(COLOURS)), rng.choice(("circle", "square"))
    margin = rng.randint(2, size // 6)
    (draw.ellipse if kind == "circle" else draw.rectangle)((margin, margin, size - 1 - margin, size - 1 - margin),
                                                           fill=COLOURS[colour])
    return image, _record(
        "colour",
        "What colour is the shape in the image? Answer with red, blue or green.",
        f"The image shows one large {colour} {kind} on a white background.",
        "The question asks for the colour of the shape, so name the colour it is filled with.",
        [f"The {kind} is filled with {colour}.", f"So the shape is {colour}."],
        colour,
        [f"filled with {colour}", f"shape is {colour}"],
    )


_MAKERS = {"count": _count, "bars": _bars, "add": _add, "colour": _colour}


# --------------------------------------------------------------------------- datasets

def make_example(seed: int, index: int, tasks: Sequence[str] = TASKS,
                 image_size: int = 56) -> tuple[Image.Image, dict]:
    """Record `index` of the dataset with this seed: (RGB image, record without image_path).

    Tasks take turns (index % len(tasks)); everything else is drawn from a generator seeded
    by (seed, index) only, so a dataset's first n records do not depend on its length.
    """
    unknown = set(tasks) - set(_MAKERS)
    if not tasks or unknown:
        raise ValueError(f"tasks must be a non-empty subset of {tuple(_MAKERS)}, got {tasks}")
    if image_size < 2 * CELL or image_size % CELL:
        raise ValueError(f"image_size must be a multiple of {CELL} and >= {2 * CELL}, got {image_size}")
    rng = random.Random(f"r1vl-synthetic:{seed}:{index}")
    return _MAKERS[tasks[index % len(tasks)]](rng, image_size)


def write_dataset(out_dir: str | Path, n: int, seed: int = 0, tasks: Sequence[str] = TASKS,
                  image_size: int = 56) -> Path:
    """Write n records to out_dir: images/NNNNN.png and data.jsonl. Returns the JSONL path.

    Each JSONL line is an R1-VL-10K record (image_path relative to out_dir, problem,
    solution, key_steps) plus "task", the kind of question.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        image, record = make_example(seed, i, tasks, image_size)
        relative = f"images/{i:05d}.png"
        image.save(out_dir / relative, format="PNG")
        lines.append(json.dumps({"image_path": relative, **record}, ensure_ascii=False))
    data = out_dir / "data.jsonl"
    data.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return data


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="directory for images/ and data.jsonl")
    parser.add_argument("--n", type=int, default=512, help="number of records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(_MAKERS))
    parser.add_argument("--image-size", type=int, default=56, help="side in pixels, a multiple of 14")
    args = parser.parse_args(argv)
    path = write_dataset(args.out_dir, args.n, args.seed, tuple(args.tasks.split(",")), args.image_size)
    print(f"wrote {args.n} records to {path}")


if __name__ == "__main__":
    main()
