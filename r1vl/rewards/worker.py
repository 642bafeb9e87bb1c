"""The user's reward functions, run in a worker process with a deadline.

    worker = reward_worker(specs, timeout_s=300)     # started and loaded once per process
    values = worker.call(spec, kwargs, group_size, sources)   # list of float | None

Why a process: a slow or hung function (a judge that never answers, a regex that backtracks
for ever) must not stall the GPU for ever. The trainer waits at most `timeout_s` per call,
then kills the worker and stops the run with a message naming the function; the worker, not
the trainer, is what crashes if the user's code does. It is a fresh interpreter
(_function_worker.py started by path, like the math-verify worker), so the user's code may
itself use CUDA, and nothing of it runs in the trainer's process, not even its imports.

Every failure is a RewardFunctionError whose message names the function, the record(s) and
what went wrong, without a traceback; train.py prints it as one `error:` line. Failures
while loading (at start-up) are ValueErrors, so that the run stops before the model loads.
"""
from __future__ import annotations

import atexit
import math
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from r1vl.rewards.functions import RewardSpec

_PROGRAM = Path(__file__).with_name("_function_worker.py")
_HEADER = struct.Struct(">Q")


class RewardFunctionError(RuntimeError):
    """A user's reward function failed during the run (raised, bad return, too slow, died)."""


class _Timeout(Exception):
    pass


class _Died(Exception):
    pass


class RewardWorker:
    """One worker process holding every user function of `specs` (built-ins are ignored).

    timeout_s: the most one call (or the start, the imports included) may take, wall time.
    """

    def __init__(self, specs: Sequence[RewardSpec], timeout_s: float):
        if not timeout_s > 0:
            raise ValueError(f"--reward_timeout_s must be > 0, got {timeout_s}")
        self.specs = [s for s in specs if not s.builtin]
        self.timeout_s = float(timeout_s)
        self._process: subprocess.Popen | None = None

    # ------------------------------------------------------------------ start-up

    def start(self) -> RewardWorker:
        """Start the worker and import every function. Raises ValueError naming the spec."""
        if self._process is not None or not self.specs:
            return self
        self._process = subprocess.Popen([sys.executable, str(_PROGRAM)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, bufsize=0)
        # The user's modules resolve as they would in the trainer, plus the working directory
        # (`package.module:function` for a package beside the data, as `python -m` would).
        entries = [(s.name, s.path, s.module, s.attr, s.text.rpartition(":")[0]) for s in self.specs]
        try:
            self._send(("load", [os.getcwd(), *[p for p in sys.path if p]], entries))
            reply = self._receive(time.monotonic() + self.timeout_s)
        except _Timeout:
            self.close()
            raise ValueError(f"--reward_funcs: importing {', '.join(s.text for s in self.specs)} took longer than "
                             f"--reward_timeout_s {self.timeout_s:g} s") from None
        except _Died as e:
            self.close()
            raise ValueError(f"--reward_funcs: the reward worker died while importing the functions ({e})") from None
        if reply[0] == "error":
            self.close()
            raise ValueError(f"--reward_funcs: {reply[1]}")
        return self

    # ------------------------------------------------------------------ calls

    def call(self, spec: RewardSpec, kwargs: dict, group_size: int, sources: Sequence[str]) -> list[float | None]:
        """spec's function on one batch: fn(**kwargs), kwargs holding prompts, completions,
        completion_ids and the columns, each a list of N = len(sources) * group_size entries.

        sources: each group's record ("<file>:<index>"), for the messages.
        Returns: N floats or None (None = no opinion). Raises RewardFunctionError.
        """
        self.start()
        n = len(kwargs["completions"])
        try:
            self._send(("call", spec.name, kwargs, group_size))
            reply = self._receive(time.monotonic() + self.timeout_s)
        except _Timeout:
            self.close()
            raise RewardFunctionError(
                f"reward function {spec.name} ({spec.text}) ran past --reward_timeout_s {self.timeout_s:g} s on "
                f"{n} completions of {_records(sources)}; it was stopped") from None
        except _Died as e:
            self.close()
            raise RewardFunctionError(f"reward function {spec.name} ({spec.text}) killed its worker ({e}) on "
                                      f"{n} completions of {_records(sources)}") from None
        if reply[0] == "raised":
            _, message, group = reply
            where = f"record {sources[group]}" if group is not None else _records(sources)
            raise RewardFunctionError(f"reward function {spec.name} ({spec.text}) raised on {where}: {message}")
        if reply[0] == "bad":
            raise RewardFunctionError(f"reward function {spec.name} ({spec.text}) {reply[1]}, on {_records(sources)}")
        values = reply[1]
        if len(values) != n:
            raise RewardFunctionError(
                f"reward function {spec.name} ({spec.text}) returned {len(values)} rewards for {n} completions "
                f"(one per completion expected), on {_records(sources)}")
        for i, v in enumerate(values):
            if v is not None and not math.isfinite(v):
                raise RewardFunctionError(
                    f"reward function {spec.name} ({spec.text}) returned {v} for completion {i % group_size} of "
                    f"record {sources[i // group_size]}; rewards must be finite (None = no opinion)")
        return values

    # ------------------------------------------------------------------ the pipe

    def _send(self, message) -> None:
        try:
            data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # noqa: BLE001 - a column the pipe cannot carry
            raise RewardFunctionError(f"the reward inputs cannot be sent to the reward worker: {e}") from None
        try:
            self._process.stdin.write(_HEADER.pack(len(data)) + data)
            self._process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise _Died(self._exit_status()) from None

    def _receive(self, deadline: float):
        header = self._read_exact(_HEADER.size, deadline)
        return pickle.loads(self._read_exact(_HEADER.unpack(header)[0], deadline))

    def _read_exact(self, n: int, deadline: float) -> bytes:
        fd = self._process.stdout.fileno()
        chunks, got = [], 0
        while got < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise _Timeout
            chunk = os.read(fd, min(n - got, 1 << 20))
            if not chunk:
                raise _Died(self._exit_status())
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _exit_status(self) -> str:
        try:
            code = self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "no reply"
        if code < 0:
            return f"signal {signal.Signals(-code).name}"
        return f"exit status {code}"

    def close(self) -> None:
        """Stop the worker (killed: it may be inside a hung call)."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            process.stdin.close()
        except OSError:
            pass
        process.kill()
        process.wait()
        process.stdout.close()


def _records(sources: Sequence[str], shown: int = 3) -> str:
    head = ", ".join(sources[:shown])
    more = f" and {len(sources) - shown} more" if len(sources) > shown else ""
    return f"record{'s' if len(sources) > 1 else ''} {head}{more}"


_workers: dict[tuple, RewardWorker] = {}


def reward_worker(specs: Sequence[RewardSpec], timeout_s: float) -> RewardWorker:
    """The process-wide worker for these functions, started (imports checked) on first use, so
    that the start-up check and the run share one."""
    key = (tuple(s for s in specs if not s.builtin), float(timeout_s))
    if key not in _workers:
        _workers[key] = RewardWorker(specs, timeout_s).start()
    return _workers[key]


@atexit.register
def _close_all() -> None:
    for worker in _workers.values():
        worker.close()
