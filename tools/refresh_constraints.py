"""Rewrite constraints.txt with the newest releases of every pinned package.

    python tools/refresh_constraints.py      # or: make constraints

Installs the project (every extra a CPU machine can build, and deepspeed) into a throwaway
virtual environment with nothing held but torch, whose CPU build is the one this machine
installs, and writes the versions pip chose for the packages constraints.txt pins: the
direct dependencies in pyproject.toml and the transitive ones listed in TRANSITIVE below.
Then run the whole suite on a fresh environment (`make clean test`) before committing the
new file: a pin is a version the suite passed with, not merely the newest one.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
EXTRAS = "train,bench,test,trackers"  # flash-attn needs CUDA to build: it stays unpinned
# Transitive dependencies whose releases have broken the stack or plausibly could: the hub
# stack transformers builds on (its `kernels` import broke the install once), the trainer
# stack TRL builds on, and the parser math-verify reads LaTeX with.
TRANSITIVE = (
    "huggingface-hub", "kernels", "accelerate", "datasets", "latex2sympy2-extended",
    "antlr4-python3-runtime", "sympy", "numpy", "safetensors", "tokenizers", "packaging",
    "setuptools",  # builds the project (pyproject.toml); the wheel test builds without isolation
)
HEADER = """\
# Every version the whole suite passed with (make test on a fresh .venv). Installs use it as
# `pip install -c constraints.txt ...`. Refresh with `make constraints` (tools/refresh_constraints.py),
# then run the suite on a fresh environment before committing.
# torch is held at the CPU wheel this machine installs (anything newer pulls CUDA packages);
# flash-attn (an optional extra, built against CUDA) is not pinned.
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0])


def pinned_names() -> list[str]:
    """Direct dependencies (pyproject.toml, extras included, flash-attn excepted) and TRANSITIVE."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra, items in project["optional-dependencies"].items():
        if extra != "flash-attn":
            requirements += items
    names = {requirement_name(r) for r in requirements} | {canonical(n) for n in TRANSITIVE}
    return sorted(names)


def current_pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s#]+)", line)
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def main() -> None:
    torch_version = current_pins()["torch"]
    with tempfile.TemporaryDirectory() as tmp:
        venv.create(tmp, with_pip=True)
        python = str(Path(tmp) / "bin" / "python")
        held = Path(tmp) / "held.txt"
        held.write_text(f"torch=={torch_version}\n")

        def pip(*args: str, env: dict | None = None) -> None:
            subprocess.run([python, "-m", "pip", "install", "-q", *args], check=True, env=env)

        pip(f"torch=={torch_version}")
        pip("-c", str(held), "--upgrade", "setuptools")
        pip("-c", str(held), f"{ROOT}[{EXTRAS}]")
        pip("-c", str(held), "deepspeed", env={**os.environ, "DS_BUILD_OPS": "0"})
        frozen = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], check=True,
                                capture_output=True, text=True).stdout
    installed = {canonical(n): v for n, v in (line.split("==", 1) for line in frozen.splitlines() if "==" in line)}
    missing = [n for n in pinned_names() if n not in installed]
    if missing:
        sys.exit(f"refresh_constraints: not installed, so not pinned: {', '.join(missing)}")
    installed["torch"] = torch_version  # held; pip reports the local label (+cpu) of its build
    lines = [f"{name}=={installed[name]}" for name in pinned_names()]
    CONSTRAINTS.write_text(HEADER + "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} pins to {CONSTRAINTS.name}; now run the suite on a fresh environment")


if __name__ == "__main__":
    main()
