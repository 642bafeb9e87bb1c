"""Can a complete-looking checkpoint be read? Checked before a resume commits to it.

A checkpoint directory under its final name was written in full (r1vl.run.checkpoints), yet a
file in it can still be unreadable: cut short on a full disk, or damaged after writing. A run
that resumes from it would fail while loading, after the model is built, however many older
checkpoints are intact. `problem(path)` reads every file a resume reads, as far as needed to
know it will load, and names the first that will not:

- trainer_state.json: present, a JSON object with stage, step and world_size;
- every *.json (config, engine state, tokenizer): parses;
- every *.safetensors (the policy's weights): the header parses and the file is exactly as
  long as the header says (8 bytes + header + the end of the last tensor), so a cut file is
  found without reading the tensors;
- every *.pt (optimizer, master weights, ZeRO shards, RNG states): torch.save's zip archive,
  every member read back and checked against its CRC-32, which finds a cut file and a
  changed byte alike (it reads the whole file: about as long as loading it);
- one rng_rank{r}.pt per rank that wrote it.

The check is deterministic on the files, so every rank that runs it on the same directory
takes the same decision without talking to the others.
"""
from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

STATE_FILE = "trainer_state.json"  # r1vl.run.checkpoints.STATE_FILE
STATE_KEYS = ("stage", "step", "world_size")


def problem(checkpoint: Path) -> str | None:
    """None if every file of `checkpoint` that a resume reads is readable; otherwise what is
    wrong, naming the file (relative to the checkpoint)."""
    checkpoint = Path(checkpoint)
    state_file = checkpoint / STATE_FILE
    if not state_file.is_file():
        return f"{STATE_FILE} is missing"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{STATE_FILE} is not readable JSON ({e})"
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        return f"{STATE_FILE} lacks {', '.join(k for k in STATE_KEYS if k not in state)}" if isinstance(
            state, dict) else f"{STATE_FILE} is not a JSON object"
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        name = path.relative_to(checkpoint).as_posix()
        try:
            if path.suffix == ".json" and path != state_file:
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".safetensors":
                _check_safetensors(path)
            elif path.suffix == ".pt":
                _check_torch_zip(path)
        except Exception as e:  # noqa: BLE001  (whatever a damaged file raises, it will not load)
            return f"{name} is not readable: {e}"
    # The weights: the whole policy's, or a LoRA run's adapters alone (r1vl.model.lora).
    if not any(checkpoint.glob("policy/*.safetensors")) and not any(checkpoint.glob("adapter/*.safetensors")):
        return "neither policy/ nor adapter/ holds *.safetensors weights"
    world_size = state["world_size"]
    missing = [f"rng_rank{r}.pt" for r in range(int(world_size)) if not (checkpoint / f"rng_rank{r}.pt").is_file()]
    if missing:
        return f"{', '.join(missing)} missing (written by {world_size} rank(s))"
    return None


def _check_safetensors(path: Path) -> None:
    """ValueError unless `path` has a parsable safetensors header and the length it implies."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise ValueError(f"truncated: a {n}-byte header in a {size}-byte file")
        header = json.loads(f.read(n).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        raise ValueError(f"truncated or padded: {size} bytes, the header describes {8 + n + end}")


def _check_torch_zip(path: Path) -> None:
    """ValueError unless `path` is a zip archive (torch.save's format) whose members all
    read back with their recorded CRC-32."""
    if not zipfile.is_zipfile(path):
        raise ValueError("not a torch.save zip archive (truncated?)")
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise ValueError(f"member {bad} fails its CRC-32 check")
