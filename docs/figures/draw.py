"""Draw the docs' figures: `python docs/figures/draw.py` writes pipeline.svg and packed_layout.svg here.

Plain matplotlib, no project imports: the pictures illustrate docs/training.md and
r1vl/update/packing.py's docstring (the same S = 3 example, token for token).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

HERE = Path(__file__).resolve().parent
plt.rcParams.update({"svg.fonttype": "none", "font.family": "DejaVu Sans", "font.size": 10,
                     "svg.hashsalt": "r1vl"})  # text stays text; ids stable between runs

# One colour per kind of row, shared by both figures.
PROMPT, IMAGE, COMP_A, COMP_B, COMP_C = "#cfd8e3", "#f2c572", "#8fc1a9", "#c9a0dc", "#7fb2e5"


# --------------------------------------------------------------------------- pipeline

STEPS = [
    ("1. sample", "r1vl.sampling", "P prompts, G completions each;\nimage + prompt prefilled once,\nKV cache shared by the G"),
    ("2. score", "r1vl.rewards", "StepRAR + StepRVR\none reward per completion\n(--reward_funcs)"),
    ("3. advantages", "r1vl.rewards", "(r - mean) / std\nwithin each group of G\n(--scale_rewards)"),
    ("4. update", "r1vl.update", "pack [prompt, c1..cG],\nref log-probs, fused loss,\noptimizer step"),
    ("5. log", "r1vl.run", "metrics.jsonl, TensorBoard,\nheld-out eval, checkpoints\n(rank 0 logs)"),
]


def box(ax, x, y, w, h, color, **kw):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=color, edgecolor="#333333", linewidth=1, **kw))


def arrow(ax, start, end, style="-|>", color="#333333", **kw):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=color,
                                 linewidth=1.2, **kw))


def draw_pipeline(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(13.5, 4.6))
    w, h, gap = 2.45, 1.25, 0.35
    lanes = [("rank 0", 2.35), ("rank 1 ... rank R-1", 0.3)]
    for lane, y in lanes:
        ax.text(-0.2, y + h / 2, lane, ha="right", va="center", fontsize=10, style="italic")
        for i, (title, module, text) in enumerate(STEPS):
            x = i * (w + gap)
            box(ax, x, y, w, h, "#eef3f8" if i != 3 else "#e4f1ea")
            ax.text(x + w / 2, y + h - 0.2, title, ha="center", va="center", weight="bold")
            ax.text(x + w / 2, y + h - 0.43, module, ha="center", va="center", fontsize=8.5,
                    family="DejaVu Sans Mono", color="#555555")
            ax.text(x + w / 2, y + 0.4, text, ha="center", va="center", fontsize=8, linespacing=1.3)
            if i:
                arrow(ax, (x - gap + 0.02, y + h / 2), (x - 0.02, y + h / 2))
        # next step: from log back to sample, under/over the lane
        last = (len(STEPS) - 1) * (w + gap)
        yy = y + h + 0.12 if y > 1 else y - 0.12
        arrow(ax, (last + w / 2, yy), (w / 2, yy), connectionstyle=f"arc3,rad={0.08 if y > 1 else -0.08}",
              color="#888888", linestyle="--")
    ax.text(2 * (w + gap) + w / 2, 2.35 + h + 0.55, "next step: a new batch of prompts (per rank)",
            ha="center", fontsize=8.5, color="#666666")
    # What crosses ranks: the gradients (every step) and, with --scale_rewards batch, reward sums.
    xu = 3 * (w + gap) + w / 2
    arrow(ax, (xu, 0.3 + h + 0.02), (xu, 2.35 - 0.02), style="<|-|>", color="#2a7f4f")
    ax.text(xu + 0.08, 1.93, "gradients all-reduced\n(or ZeRO reduce-scatter)", fontsize=8.5,
            color="#2a7f4f", va="center")
    xa = 2 * (w + gap) + w / 2
    arrow(ax, (xa, 0.3 + h + 0.02), (xa, 2.35 - 0.02), style="<|-|>", color="#999999", linestyle=":")
    ax.text(xa + 0.08, 1.93, "reward sums, only with\n--scale_rewards batch", fontsize=8.5,
            color="#777777", va="center")
    ax.set_xlim(-2.3, 5 * (w + gap))
    ax.set_ylim(-0.1, 4.4)
    ax.axis("off")
    fig.savefig(path, bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)


# --------------------------------------------------------------------------- packed layout

# r1vl/update/packing.py's shared example: A and C are one group (same prompt and image), B alone.
TOKENS = list("pvIIIIep") + ["cA"] * 2 + ["cC"] * 3 + list("pppc")
KIND = ["prompt"] * 8 + ["A"] * 2 + ["C"] * 3 + ["B"] * 4
POS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 8, 9, 10, 0, 1, 2, 3]
SEGMENTS = [(0, 8), (8, 10), (10, 13), (13, 17)]  # cu_seqlens [0, 8, 10, 13, 17]
KEYS = [list(range(8)), list(range(10)), list(range(8)) + [10, 11, 12], list(range(13, 17))]


def colour(i: int) -> str:
    if KIND[i] == "prompt":
        return IMAGE if TOKENS[i] == "I" else PROMPT
    return {"A": COMP_A, "C": COMP_C, "B": COMP_B}[KIND[i]]


def label(i: int) -> str:
    return {"cA": "a", "cC": "c"}.get(TOKENS[i], TOKENS[i])


def draw_packed(path: Path) -> None:
    n = len(TOKENS)
    fig, (top, mask) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.7, 1]})
    # Left: the row, its segments, positions and cu_seqlens.
    for i in range(n):
        top.add_patch(Rectangle((i, 3), 1, 1, facecolor=colour(i), edgecolor="#333333"))
        top.text(i + 0.5, 3.5, label(i), ha="center", va="center", family="DejaVu Sans Mono")
        top.text(i + 0.5, 4.25, str(i), ha="center", va="center", fontsize=7.5, color="#777777")
        top.text(i + 0.5, 2.5, str(POS[i]), ha="center", va="center", family="DejaVu Sans Mono", fontsize=9)
    top.text(-0.3, 4.25, "row", ha="right", va="center", fontsize=8, color="#777777")
    top.text(-0.3, 3.5, "input_ids", ha="right", va="center", fontsize=9)
    top.text(-0.3, 2.5, "position_ids[0]", ha="right", va="center", fontsize=9)
    names = ["prompt (once for A and C)", "A", "C", "B alone"]
    for k, (s, e) in enumerate(SEGMENTS):
        top.plot([s + 0.1, e - 0.1], [1.9, 1.9], color="#333333", linewidth=1)
        top.plot([s + 0.1] * 2, [1.8, 2.0], color="#333333", linewidth=1)
        top.plot([e - 0.1] * 2, [1.8, 2.0], color="#333333", linewidth=1)
        top.text((s + e) / 2, 1.55, names[k], ha="center", va="center", fontsize=8.5)
    for b in [0, 8, 10, 13, 17]:
        top.plot([b, b], [0.95, 2.95], color="#c0392b", linewidth=1.3, linestyle="--")
        top.text(b, 0.75, str(b), ha="center", va="center", color="#c0392b", fontsize=9)
    top.text(-0.3, 0.75, "cu_seqlens", ha="right", va="center", fontsize=9, color="#c0392b")
    top.text(0, 0.05,
             "C's positions continue from the prompt's end (8, 9, 10), exactly as in an unshared\n"
             "[prompt, C]; rows 1-3 of position_ids are the model's own M-RoPE t/h/w (image rows 2-5\n"
             "take the image grid's h/w). The image is encoded once; row 7 (the last prompt token)\n"
             "predicts the first completion token of both A and C.",
             fontsize=8.5, va="top", color="#444444")
    legend = [(PROMPT, "prompt text (p, v/e: vision start/end)"), (IMAGE, "image tokens (I)"),
              (COMP_A, "completion A"), (COMP_C, "completion C (same group as A)"), (COMP_B, "sequence B")]
    for j, (c, t) in enumerate(legend):
        x = (j % 2) * 9.0
        y = 6.1 - (j // 2) * 0.5
        top.add_patch(Rectangle((x, y - 0.17), 0.5, 0.34, facecolor=c, edgecolor="#333333"))
        top.text(x + 0.7, y, t, va="center", fontsize=8.5)
    top.set_xlim(-3.2, n + 0.5)
    top.set_ylim(-1.5, 6.5)
    top.set_aspect("equal")
    top.axis("off")
    top.set_title("one packed row, share_prompts=True: [prompt, A, C] and [B]", fontsize=10.5)

    # Right: which keys each query row sees (cu_seqlens_k / key_index).
    for k, (s, e) in enumerate(SEGMENTS):
        prefix = [j for j in KEYS[k] if j < s]
        for q in range(s, e):
            visible = prefix + [j for j in range(s, q + 1)]
            for j in visible:
                mask.add_patch(Rectangle((j, n - 1 - q), 1, 1, facecolor=colour(q), edgecolor="white",
                                         linewidth=0.5))
    for b in [0, 8, 10, 13, 17]:
        mask.plot([0, n], [n - b, n - b], color="#c0392b", linewidth=0.8, linestyle="--")
    mask.add_patch(Rectangle((0, 0), n, n, fill=False, edgecolor="#333333"))
    mask.set_xlim(0, n)
    mask.set_ylim(0, n)
    mask.set_aspect("equal")
    mask.set_xticks([i + 0.5 for i in range(n)], [label(i) for i in range(n)], family="DejaVu Sans Mono",
                    fontsize=8)
    mask.set_yticks([n - 0.5 - i for i in range(n)], [label(i) for i in range(n)], family="DejaVu Sans Mono",
                    fontsize=8)
    mask.tick_params(length=0)
    for side in mask.spines.values():
        side.set_visible(False)
    mask.set_xlabel("keys (columns)", fontsize=9)
    mask.set_ylabel("queries (rows)", fontsize=9)
    mask.set_title("what each row attends to: A and C see the whole prompt\n"
                   "and themselves causally, never each other", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)


if __name__ == "__main__":
    draw_pipeline(HERE / "pipeline.svg")
    draw_packed(HERE / "packed_layout.svg")
