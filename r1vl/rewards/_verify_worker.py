"""Child program that runs math-verify for `SymbolicVerifier` (see symbolic.py).

Started as `python _verify_worker.py` (by file path, so it imports nothing from r1vl and
never re-runs the parent's `__main__`). Protocol, one line each way, UTF-8:

    parent -> child: a JSON array [gold, pred]
    child -> parent: "1" (equivalent), "0" (not), "e" (math-verify raised)

and "ready" once, after the imports and a warm-up check, before the first request
("noimport <reason>" instead, and exit, when math-verify is not installed).
The parent enforces the time limit by killing this process; the alarm below is only a
backstop so that a worker whose parent died mid-request cannot compute forever.
"""
import json
import os
import resource
import signal
import sys

# Sympy on hostile input can try to build astronomically large integers (9^9^9^9); a
# memory cap turns that into a MemoryError instead of a swapping machine.
_MEMORY_LIMIT_BYTES = int(os.environ.get("R1VL_VERIFY_MEMORY_BYTES", str(2 << 30)))
_BACKSTOP_SECONDS = 60


def _on_alarm(signum, frame):
    raise TimeoutError("backstop alarm")


def main() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_LIMIT_BYTES, _MEMORY_LIMIT_BYTES))
    signal.signal(signal.SIGALRM, _on_alarm)
    import logging

    # math-verify logs a warning per call when its own (signal-based) timeout is off;
    # ours is the parent's kill, so the warning is noise.
    logging.disable(logging.WARNING)
    try:
        from math_verify import parse, verify
    except ImportError as e:
        sys.stdout.write(f"noimport {e}\n")
        sys.stdout.flush()
        return

    def check(gold: str, pred: str) -> bool:
        return bool(verify(parse(gold, parsing_timeout=None), parse(pred, parsing_timeout=None),
                           timeout_seconds=None))

    check("1", "1")  # load the grammar before declaring ready
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        signal.alarm(_BACKSTOP_SECONDS)
        try:
            gold, pred = json.loads(line)
            reply = "1" if check(gold, pred) else "0"
        except BaseException:  # noqa: BLE001 - any failure is "could not decide"
            reply = "e"
        finally:
            signal.alarm(0)
        out.write(reply + "\n")
        out.flush()


if __name__ == "__main__":
    main()
