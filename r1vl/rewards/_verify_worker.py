"""Child program that runs math-verify for `SymbolicVerifier` (see symbolic.py).

Started as `python _verify_worker.py` (by file path, so it imports nothing from r1vl and
never re-runs the parent's `__main__`). Protocol, one line each way, UTF-8:

    parent -> worker: a JSON array [gold, pred, cpu_seconds, wall_seconds]
    worker -> parent: "1" (equivalent), "0" (not), "t" (the check used up its CPU time),
                      "w" (the check hit the wall-clock backstop), "e" (it raised or died),
                      "f" (no check ran: a malformed request, or fork failed)

and "ready" once, after the imports and a warm-up, before the first request ("noimport
<reason>" instead, and exit, when math-verify is not installed). `gold` and `pred` are the
stated answers (r1vl.rewards.answer), LaTeX or plain math without delimiters.

Each check runs in its own process forked from this warm one, so a hostile answer costs
its own budget and nothing else: the worker never computes, stays warm, and answers the
next request at once. The budget is CPU time, enforced by the kernel: ITIMER_PROF sends
SIGPROF after `cpu_seconds` of CPU, and SIGPROF's default action ends the process even in
the middle of one long C call (sympy raising 9 to 9^9^9 never returns to the interpreter).
CPU time, unlike wall time, does not grow when other checks or the trainer load the
machine, so one check's verdict cannot depend on what runs beside it. The wall-clock
limit is only a backstop for a check starved of CPU altogether.
"""
import json
import os
import resource
import select
import signal
import sys

# Sympy on hostile input can try to build astronomically large integers (9^9^9^9); a
# memory cap turns that into a MemoryError instead of a swapping machine.
_MEMORY_LIMIT_BYTES = int(os.environ.get("R1VL_VERIFY_MEMORY_BYTES", str(2 << 30)))
# Forms the children meet most; checking them once here loads the grammar and fills
# sympy's lazy imports before the fork, so that each child starts warm (a cold first
# check costs 20-90 ms of CPU, a warm one 3-5 ms).
_WARM_UP = [("1", "1"), ("\\frac{1}{2}", "0.5"), ("x = 6", "6"), ("2, 3", "3, 2"),
            ("(1, 2)", "[1, 2)"), ("2\\sqrt{3}", "\\sqrt{12}"), ("50\\%", "0.5"),
            ("45^\\circ", "45"), ("y = 2x + 1", "2x+1")]


def _run_isolated(check, gold: str, pred: str, cpu_s: float, wall_s: float) -> str:
    """check(gold, pred) in a forked child within cpu_s of CPU and wall_s of wall time."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the check's own process: write one byte, never return
        reply = b"e"
        try:
            os.close(read_fd)
            signal.setitimer(signal.ITIMER_PROF, cpu_s)
            reply = b"1" if check(gold, pred) else b"0"
        except BaseException:  # noqa: BLE001 - any failure is "could not decide"
            pass
        finally:
            os.write(write_fd, reply)
            os._exit(0)
    os.close(write_fd)
    try:
        poller = select.poll()
        poller.register(read_fd, select.POLLIN)
        data = os.read(read_fd, 1) if poller.poll(wall_s * 1000) else b""
        if not data:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(read_fd)
    if data in (b"1", b"0", b"e"):
        return data.decode()
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGPROF:
        return "t"
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "w"
    return "e"


def main() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_LIMIT_BYTES, _MEMORY_LIMIT_BYTES))
    import logging

    # math-verify logs a warning per call when its own (signal-based) timeout is off;
    # ours is the kernel's, so the warning is noise.
    logging.disable(logging.WARNING)
    try:
        from math_verify import LatexExtractionConfig, parse, verify
    except ImportError as e:
        sys.stdout.write(f"noimport {e}\n")
        sys.stdout.flush()
        return

    latex_only = [LatexExtractionConfig()]

    def read(answer: str):
        # The whole stated answer as one LaTeX formula: lists become sets, "x = 6" an
        # equation. first_match without fallback: never a number picked out of it.
        return parse("$" + answer.replace("$", " ") + "$", latex_only, parsing_timeout=None,
                     extraction_mode="first_match", fallback_mode="no_fallback")

    def check(gold: str, pred: str) -> bool:
        return bool(verify(read(gold), read(pred), timeout_seconds=None))

    for gold, pred in _WARM_UP:
        check(gold, pred)
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:  # EOF when the parent exits: the worker ends with it
        try:
            gold, pred, cpu_s, wall_s = json.loads(line)
            reply = _run_isolated(check, gold, pred, float(cpu_s), float(wall_s))
        except Exception:  # noqa: BLE001 - a malformed request or no fork: "could not decide"
            reply = "f"
        out.write(reply + "\n")
        out.flush()


if __name__ == "__main__":
    main()
