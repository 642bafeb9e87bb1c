"""The checkout installs as the ecosystem expects and shadows nothing a dependency imports.

- From the project's root (where `python train.py`, `python -m ...` and pip's build steps
  run, the root first on sys.path) every top-level import name of every installed
  distribution, and `kernels`, resolves to the installed files, never to the checkout.
- A wheel built from the checkout holds every module of r1vl and r1vl_kernels, and nothing else.
- r1vl_kernels needs torch and triton only: its wheel requires nothing else, and it imports
  with every other distribution blocked.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN_PACKAGES = {"r1vl", "r1vl_kernels"}
# The source roots of the two packages: r1vl/ at the root, r1vl_kernels/ under kernels/.
SOURCES = {"r1vl": ROOT / "r1vl", "r1vl_kernels": ROOT / "kernels" / "r1vl_kernels"}

_RESOLVE = r"""
import importlib.metadata, importlib.util, json, os, sys
root = os.path.realpath(sys.argv[1])
names = {n for n in importlib.metadata.packages_distributions() if n.isidentifier()}
names -= set(json.loads(sys.argv[2]))
names |= {"kernels"}
found = {}
for name in sorted(names):
    try:
        spec = importlib.util.find_spec(name)
    except Exception as exc:  # a broken third-party .pth or finder: report, not crash
        found[name] = {"error": repr(exc)}
        continue
    if spec is None:
        continue
    if spec.origin not in (None, "namespace"):
        places = [spec.origin]
    else:
        places = list(spec.submodule_search_locations or [])
    found[name] = {"regular": spec.origin not in (None, "namespace"),
                   "places": [os.path.realpath(p) for p in places]}
print(json.dumps(found))
"""


def _inside_checkout(path: str) -> bool:
    """In the checkout's own files; an environment kept inside it (.venv) is not the checkout."""
    path, environment = Path(path), Path(sys.prefix).resolve()
    return (path == ROOT or ROOT in path.parents) and environment not in path.parents


def test_no_installed_name_resolves_into_the_checkout():
    """`kernels` was Hugging Face's package (transformers >= 5.25 imports it) and this
    checkout's kernel folder at once: run from the root, the folder won and broke pip's
    egg_info and every script. A namespace folder (no __init__.py) never wins over an
    installed package, so the check is on what a name resolves to."""
    out = subprocess.run([sys.executable, "-c", _RESOLVE, str(ROOT), json.dumps(sorted(OWN_PACKAGES))],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    found = json.loads(out.stdout)
    shadowed = {name: info for name, info in found.items()
                if "error" not in info and info["regular"] and any(map(_inside_checkout, info["places"]))}
    assert not shadowed, f"resolve into the checkout from its root: {shadowed}"
    # A name that resolves to the checkout only as a namespace (a folder without __init__.py)
    # is one that no installed distribution provides as a package: portions merge, they do
    # not replace.
    errors = {name: info["error"] for name, info in found.items() if "error" in info}
    assert not errors, errors


def test_only_the_trainer_is_a_package_at_the_root():
    """Folders at the root hold no __init__.py but r1vl's, so that none can become a
    package named like a distribution's (kernels, tests, benchmarks, tools)."""
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["r1vl"]


def _source_modules() -> set[str]:
    files = set()
    for package, source in SOURCES.items():
        for path in source.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.add(f"{package}/{path.relative_to(source).as_posix()}")
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from a copy of the checkout's sources (setuptools from the
    environment: no download). A copy, because setuptools reuses the build/ folder of an
    earlier build in the checkout, which may hold modules since moved or deleted."""
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source") / "r1vl"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "runs", "__pycache__", ".pytest_cache", ".benchmarks"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(source)], check=True, capture_output=True, text=True, timeout=300)
    (path,) = out.glob("r1vl-*.whl")
    return path


def test_wheel_holds_every_module_and_nothing_else(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = {n for n in archive.namelist() if ".dist-info/" not in n}
    expected = _source_modules()
    assert {"r1vl/rewards/__init__.py", "r1vl/eval/__init__.py", "r1vl_kernels/__init__.py"} <= expected
    assert sorted(expected - names) == [], "modules of the source tree missing from the wheel"
    assert sorted(names - expected) == [], "files in the wheel that are not the packages' sources"


def test_wheel_requires_torch_and_triton_only_without_extras(wheel):
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        lines = archive.read(metadata).decode().splitlines()
    required = sorted(line.split(":", 1)[1].strip().split(">")[0].split("=")[0].split("<")[0].strip()
                      for line in lines if line.startswith("Requires-Dist:") and "extra ==" not in line)
    assert required == ["torch", "triton"]


_BLOCKED_IMPORT = r"""
import importlib.abc, importlib.metadata, re, sys
from packaging.requirements import Requirement

def closure(roots):
    seen, todo = set(), list(roots)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen

allowed = closure(["torch", "triton"])
blocked = set()
for module, dists in importlib.metadata.packages_distributions().items():
    if not any(re.sub(r"[-_.]+", "-", d).lower() in allowed for d in dists):
        blocked.add(module)
blocked -= {"r1vl_kernels", "packaging"}  # packaging: this check's own import, already loaded

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"blocked: {name}", name=name)  # as if not installed
        return None

sys.meta_path.insert(0, Block())
import r1vl_kernels
print("ok", sorted(m for m in blocked if m in sys.modules))
"""


def test_r1vl_kernels_imports_with_everything_but_torch_and_triton_blocked():
    """Without TRITON_INTERPRET, as a user imports it: the package defines its Triton kernels
    at import, and under the interpreter triton.jit loads triton's interpreter, which needs
    numpy (a need of triton's interpreter, not of r1vl_kernels)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _BLOCKED_IMPORT], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok []", out.stdout
