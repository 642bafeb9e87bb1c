"""One progress bar for the trainer, the sampler and the evaluation."""
from __future__ import annotations

import sys


def progress_bar(total: int, desc: str, enabled: bool, **options):
    """A tqdm bar (disabled: one that prints nothing, with the same methods). `options` go to
    tqdm; by default the bar writes to stdout and fits the terminal's width."""
    from tqdm import tqdm

    options = {"file": sys.stdout, "dynamic_ncols": True, **options}
    return tqdm(total=total, desc=desc, disable=not enabled, **options)
