"""Child program that runs the user's reward functions for `RewardWorker` (see worker.py).

Started as `python _function_worker.py` (by file path, so it imports nothing from r1vl and
the user's code never runs in the trainer's process). Protocol: frames of an 8-byte
big-endian length and a pickle, on the worker's stdin and on a copy of its original stdout
(the user's prints go to stderr, so they cannot corrupt a reply):

    parent -> worker                                  worker -> parent
    ("load", sys_path, [(name, path, module, attr, shown)])  ("ok",) | ("error", message)
    ("call", name, kwargs, group_size)                ("ok", values) | ("raised", message, group)
                                                      | ("bad", message)

`values` is a list of float or None, one per entry of the function's return. A function that
raises on the batch is called again on each group of `group_size` completions alone, to name
the first group it raises on (`group`, None when it raises on the batch only). `message`
ends with the file and line it raised from. A coroutine function is run to completion with asyncio.
"""
import asyncio
import importlib
import importlib.util
import inspect
import os
import pickle
import struct
import sys
import traceback

_HEADER = struct.Struct(">Q")


def _read(stream):
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None  # the parent closed the pipe: stop
    return pickle.loads(stream.read(_HEADER.unpack(header)[0]))


def _write(stream, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _where(error: BaseException) -> str:
    """'file.py line 12' of the innermost frame the error passed through."""
    frames = traceback.extract_tb(error.__traceback__)
    return f"{os.path.basename(frames[-1].filename)} line {frames[-1].lineno}" if frames else ""


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".rstrip(": ")
    where = _where(error)
    return f"{text} ({where})" if where else text


def _load(name: str, path: str, module: str, attr: str, shown: str):
    """The function, or a message saying why it cannot be had (naming the file or module as
    the user wrote it: `shown`)."""
    try:
        if path:
            spec = importlib.util.spec_from_file_location(f"r1vl_reward_{name.replace('.', '_')}", path)
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = loaded
            spec.loader.exec_module(loaded)
        else:
            loaded = importlib.import_module(module)
    except BaseException as e:  # noqa: BLE001 - the user's module failed to import: say how
        return None, f"importing {shown} failed: {_describe(e)}"
    if not hasattr(loaded, attr):
        return None, f"{shown} has no attribute {attr!r}"
    fn = getattr(loaded, attr)
    if not callable(fn):
        return None, f"{shown}:{attr} is a {type(fn).__name__}, not a function"
    return fn, None


def _as_values(result):
    """The return as a list of float or None; a message if it is not one."""
    if hasattr(result, "tolist") and not isinstance(result, (list, tuple)):
        result = result.tolist()  # numpy arrays, torch tensors
    if not isinstance(result, (list, tuple)):
        return None, f"returned a {type(result).__name__}, expected a list of floats (or None)"
    values = []
    for i, v in enumerate(result):
        if v is None:
            values.append(None)
            continue
        try:
            values.append(float(v))
        except (TypeError, ValueError):
            return None, f"returned {type(v).__name__} {v!r:.60} at position {i}, expected a float or None"
    return values, None


def _call(fn, kwargs: dict):
    result = fn(**kwargs)
    if inspect.isawaitable(result):
        result = asyncio.run(_await(result))
    return result


async def _await(awaitable):
    return await awaitable


def _group(kwargs: dict, start: int, stop: int) -> dict:
    """kwargs restricted to completions start..stop-1 (every per-completion list sliced)."""
    n = len(kwargs["completions"])
    return {k: v[start:stop] if isinstance(v, list) and len(v) == n else v for k, v in kwargs.items()}


def _first_failing_group(fn, kwargs: dict, group_size: int):
    n = len(kwargs["completions"])
    for g, start in enumerate(range(0, n, max(group_size, 1))):
        try:
            _call(fn, _group(kwargs, start, start + group_size))
        except BaseException as e:  # noqa: BLE001
            return g, e
    return None, None


def _ignored(*args, **kwargs) -> None:
    """TRL's log_extra / log_metric: accepted so that TRL reward functions run, not recorded."""


def main() -> None:
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb")  # the protocol's channel ...
    os.dup2(2, 1)  # ... and the user's prints go to stderr,
    sys.stdout = sys.stderr  # line by line, as they happen
    sys.stdin = open(os.devnull)  # the requests' pipe is not the user's to read
    functions = {}
    while True:
        message = _read(requests)
        if message is None:
            return
        if message[0] == "load":
            _, sys_path, entries = message
            sys.path[:] = sys_path  # the parent's, not this file's directory
            for name, path, module, attr, shown in entries:
                fn, error = _load(name, path, module, attr, shown)
                if error:
                    _write(replies, ("error", error))
                    break
                functions[name] = fn
            else:
                _write(replies, ("ok",))
            continue
        _, name, kwargs, group_size = message
        fn = functions[name]
        kwargs = {**kwargs, "log_extra": _ignored, "log_metric": _ignored}
        try:
            result = _call(fn, kwargs)
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which stops the run
            group, group_error = _first_failing_group(fn, kwargs, group_size)
            error = group_error or e
            _write(replies, ("raised", _describe(error), group))
            continue
        values, problem = _as_values(result)
        _write(replies, ("ok", values) if problem is None else ("bad", problem))


if __name__ == "__main__":
    main()
