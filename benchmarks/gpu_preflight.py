"""The GPU session's preflight (benchmarks/gpu_session.sh): the versions the session needs,
then one compiled decode step of the tiny model against the eager step, in about 20 s.

    python benchmarks/gpu_preflight.py [--device cpu --backend eager]   # the dry mode's form

Fails (exit status 1, one line saying why) on transformers older than 5.25 (on 5.17 the packed
update silently drops the image features: its forward has no `mm_encoder_outputs`), on torch
older than 2.10, or when the compiled step's logits differ from the eager step's.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

import torch

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

from bench_decode_step import tiny_step_inputs  # noqa: E402

MIN_TRANSFORMERS = (5, 25)
MIN_TORCH = (2, 10)


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def check_versions() -> list[str]:
    """What is wrong with the installed packages (empty: nothing)."""
    import transformers

    problems = []
    if _version(transformers.__version__) < MIN_TRANSFORMERS:
        problems.append(f"transformers {transformers.__version__} < 5.25: carry its wheels (docs/benchmarks.md)")
    else:
        from transformers import Qwen2VLModel
        if "mm_encoder_outputs" not in inspect.signature(Qwen2VLModel.forward).parameters:
            problems.append(f"transformers {transformers.__version__}: Qwen2VLModel.forward takes no "
                            "mm_encoder_outputs")
    if _version(torch.__version__) < MIN_TORCH:
        problems.append(f"torch {torch.__version__} < 2.10")
    return problems


def compiled_step(device: str, backend: str) -> float:
    """Seconds for one compiled decode step (compile included), checked against the eager step."""
    from r1vl.sampling.decode import decode_step

    _, args = tiny_step_inputs(8, 64, prompts=2)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    model = args[0].to(device)
    fused = [type(f)(*(None if t is None else t.to(device) for t in f)) for f in args[-1]]
    args = (model, *args[1:-1], fused)
    cache = [a.clone() for a in args[10:12]]
    start = time.perf_counter()
    with torch.no_grad(), torch._dynamo.config.patch(specialize_int=True):
        got = torch.compile(decode_step, backend=backend, fullgraph=True)(*args)
        if device == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    args[10].copy_(cache[0])
    args[11].copy_(cache[1])
    with torch.no_grad():
        want = decode_step(*args[:3], 3, *args[4:])
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="inductor")
    a = parser.parse_args()
    import transformers
    versions = dict(python=sys.version.split()[0], torch=torch.__version__, transformers=transformers.__version__)
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = "missing"
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    if a.device == "cuda":
        if not torch.cuda.is_available():
            print("preflight: no CUDA device", flush=True)
            return 1
        print(f"device: {torch.cuda.get_device_name()}", flush=True)
    problems = check_versions()
    for p in problems:
        print(f"preflight: {p}", flush=True)
    if problems:
        return 1
    seconds = compiled_step(a.device, a.backend)
    print(f"preflight: one compiled decode step ({a.backend}, {a.device}) in {seconds:.1f} s, "
          "logits = eager's", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
