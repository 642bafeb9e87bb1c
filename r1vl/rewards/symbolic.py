"""math-verify equivalence of two stated answers, each check on its own bounded budget.

math-verify's own timeout is `signal.alarm`, which works only in the main thread and
cannot interrupt a single long C-level operation (sympy computing 9^9^9^9 is one
bytecode). So the checks run in warm worker processes (`_verify_worker.py`), and each
check in a process forked from its worker with its own CPU-time budget (`timeout_s`),
which the kernel enforces. A hostile answer therefore costs its own budget and nothing
else: it cannot take time from another check, and no check is ever skipped for lack of
time, so scoring a completion alongside others gives the verdict it gets alone. A check
that runs out of budget, crashes, or gets input longer than `max_chars` or nested deeper
than `max_nesting` is undecided (None), which the reward treats as "not shown equivalent"
and the trainer counts (the `undecided` metric).

Bound. A batch of U distinct pairs on W workers takes at most about
ceil(U / W) * (timeout_s + ~20 ms of fork and pipe traffic) of wall time when each worker
has a core, and U * timeout_s of CPU; `wall_timeout_s` per check caps it even when the
machine starves the checks of CPU. Honest checks take 3-5 ms of CPU each; verdicts
(undecided ones included, which are as reproducible as the CPU budget) are cached.
"""
from __future__ import annotations

import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_WORKER_SCRIPT = str(Path(__file__).with_name("_verify_worker.py"))


class _Worker:
    """One child process and its pipe; used by one thread at a time."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, _WORKER_SCRIPT],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            bufsize=0,
        )
        self._buffer = b""
        self.ready = False
        # poll, not select: select fails on descriptors above 1024, which a trainer with
        # many open files and sockets reaches.
        self._poll = select.poll()
        self._poll.register(self.proc.stdout.fileno(), select.POLLIN)

    def _read_line(self, deadline: float) -> str | None:
        """The next line from the child, or None at the deadline or on EOF."""
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._poll.poll(remaining * 1000):
                return None
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def wait_ready(self, deadline: float) -> bool:
        if not self.ready:
            line = self._read_line(deadline)
            if line is not None and line.startswith("noimport"):
                # Not a transient failure: every replacement would fail the same way.
                raise RuntimeError(f"math-verify cannot be imported ({line[9:]}); install it, "
                                   "or score with RewardConfig(symbolic=False)")
            self.ready = line == "ready"
        return self.ready

    def request(self, gold: str, pred: str, cpu_s: float, wall_s: float,
                deadline: float) -> str | None:
        try:
            self.proc.stdin.write((json.dumps([gold, pred, cpu_s, wall_s]) + "\n").encode())
        except (BrokenPipeError, OSError):
            return None
        return self._read_line(deadline)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            stream.close()


def _nesting(text: str) -> int:
    """The deepest nesting of (), [] and {} in `text` (unbalanced closers are ignored)."""
    depth = deepest = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}" and depth:
            depth -= 1
    return deepest


def _shutdown(workers: list[_Worker], owner_pid: int) -> None:
    # A forked child (e.g. a DataLoader worker) inherits the list but not the processes'
    # ownership: only the process that started the workers stops them.
    if os.getpid() != owner_pid:
        return
    for w in workers:
        w.kill()
    workers.clear()


class SymbolicVerifier:
    """A pool of warm math-verify workers; every check gets its own CPU-time budget.

    Args:
        num_workers: worker processes (each about 100 MB; checks run in parallel up to this).
        timeout_s: the CPU time one check may use (seconds). Past it the check's process is
            ended by the kernel and the check is undecided; the worker stays warm. CPU time,
            not wall time, so the verdict does not depend on the machine's load.
        wall_timeout_s: the wall-clock backstop of one check, for a check that gets no CPU
            at all (a stopped or starved process); never reached on a working machine.
        max_chars: longer answers are not parsed at all (undecided): real final answers are
            short, and parse time grows fast with length.
        max_nesting: answers with deeper bracket nesting are not parsed (undecided): the
            LaTeX parser is exponential in bare brace depth ("{{{{{1}}}}}" takes 0.2 s,
            depth 20 takes 2 s), while real answers nest a few levels.
        startup_timeout_s: how long to wait for a fresh worker to import math-verify and
            warm up (about 0.5 s on an idle machine, 5 s or more on a crowded one); not
            charged to any check, so generous: a worker that misses it makes a check undecided.
        cache_size: remembered (gold, pred) verdicts; the G completions of a prompt often
            share an answer, and so do successive steps.

    Thread-safe: any number of threads may call `check` at once; each takes a free worker.
    Call `close()` (or use it as a context manager) to stop the workers; they are also
    stopped at interpreter exit.
    """

    # A worker that has not answered this long after its check's own wall backstop is
    # itself stuck: it is killed and replaced.
    _REPLY_GRACE_S = 5.0

    def __init__(self, num_workers: int = 2, timeout_s: float = 0.5,
                 wall_timeout_s: float = 10.0, max_chars: int = 200, max_nesting: int = 10,
                 startup_timeout_s: float = 60.0, cache_size: int = 65536) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not 0 < timeout_s < float("inf"):
            raise ValueError(f"timeout_s must be > 0 and finite, got {timeout_s}")
        if not timeout_s <= wall_timeout_s < float("inf"):
            raise ValueError(f"wall_timeout_s must be finite and >= timeout_s ({timeout_s}), "
                             f"got {wall_timeout_s}")
        self.timeout_s = timeout_s
        self.wall_timeout_s = wall_timeout_s
        self.max_chars = max_chars
        self.max_nesting = max_nesting
        self.startup_timeout_s = startup_timeout_s
        self.num_workers = num_workers
        self._cache: OrderedDict[tuple[str, str], bool | None] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        self._all: list[_Worker] = []
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._closed = False
        for _ in range(num_workers):
            self._add_worker()
        self._finalizer = weakref.finalize(self, _shutdown, self._all, os.getpid())

    def _add_worker(self) -> None:
        w = _Worker()
        self._all.append(w)
        self._idle.put(w)

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._all.remove(w)
        if not self._closed:
            self._add_worker()

    def check(self, gold: str, pred: str) -> bool | None:
        """True/False when math-verify decides whether the stated answer `pred` equals
        `gold` within the budget; None (undecided) when the check runs out of it, crashes,
        or gets input over the length or nesting caps.

        gold, pred: stated answers (`r1vl.rewards.answer.stated_answer(...).text`), LaTeX
        or plain math; each is read whole as one formula (a list "2, 3" is a set).
        """
        if self._closed:
            raise RuntimeError("SymbolicVerifier is closed")
        if max(len(gold), len(pred)) > self.max_chars:
            return None
        if max(_nesting(gold), _nesting(pred)) > self.max_nesting:
            return None
        key = (gold, pred)
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        verdict, reproducible = self._run(gold, pred)
        if reproducible:  # not after a wall-clock backstop, which may be the machine's load
            with self._cache_lock:
                self._cache[key] = verdict
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return verdict

    def _run(self, gold: str, pred: str) -> tuple[bool | None, bool]:
        """(verdict, whether the same input would surely give it again)."""
        w = self._idle.get()
        while w.proc.poll() is not None and not self._closed:
            self._replace(w)  # it died while idle: not this check's fault
            w = self._idle.get()
        try:
            if not w.wait_ready(time.monotonic() + self.startup_timeout_s):
                self._replace(w)
                return None, False
            deadline = time.monotonic() + self.wall_timeout_s + self._REPLY_GRACE_S
            reply = w.request(gold, pred, self.timeout_s, self.wall_timeout_s, deadline)
            if reply is None:  # a stuck or dead worker: its state is unknown, start over
                self._replace(w)
                return None, False
            self._idle.put(w)
            # "t" (out of CPU) and "e" (math-verify raised) depend on the input only; "w"
            # (wall backstop) and "f" (no fork) may be the machine's state.
            return {"1": True, "0": False}.get(reply), reply in ("1", "0", "t", "e")
        except BaseException:
            self._replace(w)
            raise

    def check_many(self, pairs: Sequence[tuple[str, str]]) -> list[bool | None]:
        """`check` on each (gold, pred) pair, distinct pairs spread over the workers.

        Every pair is checked on its own budget, whatever the others cost: the verdicts
        are those `check` gives each pair alone. Time: see the module docstring's bound.
        """
        unique = list(dict.fromkeys(pairs))
        if len(unique) <= 1 or self.num_workers == 1:
            verdicts = [self.check(*pair) for pair in unique]
        else:
            with ThreadPoolExecutor(self.num_workers) as pool:
                verdicts = list(pool.map(lambda pair: self.check(*pair), unique))
        table = dict(zip(unique, verdicts))
        return [table[p] for p in pairs]

    def close(self) -> None:
        """Stop the worker processes. Idempotent."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> SymbolicVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
