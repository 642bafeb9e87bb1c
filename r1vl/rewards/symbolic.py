"""math-verify equivalence with a hard time bound, callable from any thread.

math-verify's own timeout is `signal.alarm`, which works only in the main thread and
cannot interrupt a single long C-level operation (sympy computing 9^9^9^9 is one
bytecode). So the check runs in child processes (`_verify_worker.py`), and the caller
waits on the pipe with `poll` and a deadline; a worker that misses it is killed and
replaced. A check that times out, crashes, or gets input longer than `max_chars` or nested
deeper than `max_nesting` is undecided (None), which the reward treats as "not shown
equivalent". A batch (`check_many`) also has a total budget.

Cost: a few hundred microseconds of pipe traffic per check plus math-verify itself
(typically 1-30 ms); results are cached, and the trainer's scoring calls `check_many`,
which spreads distinct pairs over the workers.
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

    def request(self, gold: str, pred: str, deadline: float) -> str | None:
        try:
            self.proc.stdin.write((json.dumps([gold, pred]) + "\n").encode())
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
    """A pool of math-verify worker processes with a per-check deadline.

    Args:
        num_workers: child processes (each about 100 MB; checks run in parallel up to this).
        timeout_s: the most one check may take once a worker is free; past it the worker is
            killed and the check is undecided.
        max_chars: longer answers are not parsed at all (undecided): real final answers are
            short, and parse time grows fast with length.
        max_nesting: answers with deeper bracket nesting are not parsed (undecided): the
            LaTeX parser is exponential in bare brace depth ("{{{{{1}}}}}" takes 0.2 s,
            depth 20 takes 2 s), while real answers nest a few levels.
        batch_budget_s: `check_many` starts no new check after this many seconds (those
            left are undecided), so a batch full of distinct hanging answers costs a bounded
            time, not count * timeout_s. None: no budget.
        startup_timeout_s: how long to wait for a fresh worker to import math-verify (about
            0.3 s on an idle machine). Kept apart from `timeout_s` so that a slow start on a
            busy machine does not turn honest checks into undecided ones.
        cache_size: remembered (gold, pred) verdicts (decided ones only); the G completions
            of a prompt often share an answer, and so do successive steps.

    Thread-safe: any number of threads may call `check` at once; each takes a free worker.
    Call `close()` (or use it as a context manager) to stop the workers; they are also
    stopped at interpreter exit.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 0.5, max_chars: int = 200,
                 max_nesting: int = 10, batch_budget_s: float | None = 10.0,
                 startup_timeout_s: float = 10.0, cache_size: int = 65536) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.max_chars = max_chars
        self.max_nesting = max_nesting
        self.batch_budget_s = batch_budget_s
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
        """True/False when math-verify decides whether `pred` equals `gold` in time; None
        (undecided) on a timeout, a crash, or input over the length or nesting caps."""
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
        verdict = self._run(gold, pred)
        if verdict is not None:  # a timeout may be the machine's load, not the input: retry later
            with self._cache_lock:
                self._cache[key] = verdict
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return verdict

    def _run(self, gold: str, pred: str) -> bool | None:
        w = self._idle.get()
        try:
            if not w.wait_ready(time.monotonic() + self.startup_timeout_s):
                self._replace(w)
                return None
            reply = w.request(gold, pred, time.monotonic() + self.timeout_s)
            if reply is None:  # deadline or a dead worker: its state is unknown, start over
                self._replace(w)
                return None
            self._idle.put(w)
            return {"1": True, "0": False}.get(reply)
        except BaseException:
            self._replace(w)
            raise

    def check_many(self, pairs: Sequence[tuple[str, str]]) -> list[bool | None]:
        """`check` on each (gold, pred) pair, distinct pairs spread over the workers.

        Within `batch_budget_s`: a pair not started by then is undecided (None).
        """
        unique = list(dict.fromkeys(pairs))
        budget = self.batch_budget_s
        deadline = None if budget is None else time.monotonic() + budget

        def one(pair: tuple[str, str]) -> bool | None:
            if deadline is not None and time.monotonic() > deadline:
                return None
            return self.check(*pair)

        if len(unique) <= 1 or self.num_workers == 1:
            verdicts = [one(pair) for pair in unique]
        else:
            with ThreadPoolExecutor(self.num_workers) as pool:
                verdicts = list(pool.map(one, unique))
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
