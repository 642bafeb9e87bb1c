"""One progress bar for the trainer, the sampler and the evaluation.

On a terminal it is a tqdm bar, redrawn in place. When the output goes to a file or a pipe
(a batch job's log, `| tee`), carriage-return redraws would pile up into one unreadable line
interleaved with the console lines, so the bar prints plain lines instead: one per step.
"""
from __future__ import annotations

import sys
import time


def progress_bar(total: int, desc: str, enabled: bool, **options):
    """A tqdm bar on a terminal, a LineProgress when `file` (default stdout) is not one, and one
    that prints nothing when disabled or transient (leave=False) off a terminal, all with the
    same methods. `options` go to tqdm; by
    default the bar writes to stdout and fits the terminal's width."""
    from tqdm import tqdm

    options = {"file": sys.stdout, "dynamic_ncols": True, **options}
    if enabled and not _is_tty(options["file"]):
        if not options.get("leave", True):  # a transient bar (tokens of one rollout): no lines
            return tqdm(total=total, disable=True)
        return LineProgress(total, desc, file=options["file"], initial=options.get("initial", 0))
    return tqdm(total=total, desc=desc, disable=not enabled, **options)


def _is_tty(file) -> bool:
    isatty = getattr(file, "isatty", None)
    return bool(isatty and isatty())


class LineProgress:
    """The part of tqdm's interface the trainer uses, printing one line per update:
    `desc n/total elapsed | postfix`. Set the postfix before update() for it to show on
    that step's line."""

    def __init__(self, total: int, desc: str, file=None, initial: int = 0):
        self.total, self.desc, self.n = total, desc, initial
        self.file = file if file is not None else sys.stdout
        self.postfix = ""
        self.start = time.perf_counter()

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        line = f"{self.desc} {self.n}/{self.total} {time.perf_counter() - self.start:.0f}s"
        print(line + (f" | {self.postfix}" if self.postfix else ""), file=self.file, flush=True)

    def write(self, text: str, file=None) -> None:
        print(text, file=file if file is not None else self.file, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
