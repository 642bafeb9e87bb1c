"""Write under a temporary name, then rename: a file or directory under its final name is
always complete, whatever killed the process while it was being written.

    tmp = temporary(path)            # path's sibling ".tmp-<name>", cleared
    ... write tmp (a file, or a directory and its files) ...
    publish(tmp, path)               # replaces what was at path

    write_text(path, text)           # the same for one text file
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def temporary(path: str | Path, clear: bool = True) -> Path:
    """The temporary sibling of `path` (".tmp-<name>" in the same directory, hence on the same
    file system, so that the rename is atomic). clear: remove what an earlier write, killed
    halfway, left there (False for the ranks that write into a directory rank 0 cleared)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    if clear:
        _remove(tmp)
    return tmp


def publish(tmp: str | Path, path: str | Path, durable: bool = False) -> Path:
    """Move the finished `tmp` to `path`, replacing a file or directory already there.

    durable: fsync the written files and the directories first, so that the rename cannot
    reach the disk before the data (checkpoints that must survive a power loss)."""
    tmp, path = Path(tmp), Path(path)
    if durable:
        _fsync_tree(tmp)
    if path.is_dir() and not path.is_symlink():  # os.replace does not replace a directory
        shutil.rmtree(path)
    os.replace(tmp, path)
    if durable:
        _fsync(path.parent)
    return path


def write_text(path: str | Path, text: str, durable: bool = False) -> None:
    """`text` into `path` (UTF-8) through a temporary file; an existing file keeps its mode."""
    path = Path(path)
    tmp = temporary(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        publish(tmp, path, durable)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for file in path.rglob("*"):
            if file.is_file():
                _fsync(file)
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
