"""The compiled decode step's time per token at two cache capacities, in the first column
bucket (32 columns read): with the KV column written in place the two are equal; a step that
copies the whole cache at each token grows with the capacity (max_new_tokens).

    python benchmarks/bench_decode_step.py [--rows 64] [--capacities 32 256] [--backend inductor]

The tiny built-in model (r1vl.tiny: 4 layers, 2 KV heads of 32) on the CPU, fp32, random cache
contents; one compile per capacity (inductor: tens of seconds each on a CPU), then the median
of --tokens timed steps. Prints one CSV row per capacity.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from r1vl.sampling.decode import decode_step, fuse_layers  # noqa: E402
from r1vl.sampling.kv_cache import RolloutCache  # noqa: E402
from r1vl.tiny import build_model, build_tokenizer  # noqa: E402


def tiny_step_inputs(rows: int, capacity: int, prompts: int = 4, prompt_len: int = 40, seed: int = 0):
    """(model, args) for decode_step: `rows` rows over `prompts` prompts of the tiny model, a
    cache of `capacity` completion columns filled with random keys/values, column 3 next
    (the first column bucket: 32 columns read, masked past column 3)."""
    tokenizer = build_tokenizer(["a tiny vocabulary for a decode step"], vocab_size=400)
    model = build_model(tokenizer, seed=seed).eval()
    lm = model.model.language_model
    cache = RolloutCache.allocate([prompt_len] * prompts, rows // prompts, capacity, len(lm.layers),
                                  lm.config.num_key_value_heads, lm.layers[0].self_attn.head_dim,
                                  torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    for t in (cache.prefix_k, cache.prefix_v, cache.comp_k, cache.comp_v):
        t.copy_(torch.randn(t.shape, generator=g))
    group = rows // prompts
    tokens = torch.randint(0, model.config.text_config.vocab_size, (rows,), generator=g)
    positions = torch.full((rows,), prompt_len + 3)
    slots = torch.arange(rows)
    columns = min(32, capacity)
    args = (model, tokens, positions, torch.tensor(3), slots, group, prompts, cache.prefix_k, cache.prefix_v,
            cache.prefix_bias, cache.comp_k, cache.comp_v, columns, True, fuse_layers(model))
    return model, args


def time_step(rows: int, capacity: int, backend: str, tokens: int) -> tuple[float, float]:
    """(compile seconds, median seconds per step) of the compiled step."""
    torch._dynamo.reset()
    _, args = tiny_step_inputs(rows, capacity)
    step = torch.compile(decode_step, backend=backend, fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(specialize_int=True):
        start = time.perf_counter()
        step(*args)
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(tokens):
            start = time.perf_counter()
            step(*args)
            times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times)


def time_eager(rows: int, capacity: int, tokens: int) -> float:
    """Median seconds per step of the eager step (an int column, the columns read as compiled)."""
    _, args = tiny_step_inputs(rows, capacity)
    args = (*args[:3], 3, *args[4:])
    times = []
    with torch.no_grad():
        for _ in range(tokens + 1):
            start = time.perf_counter()
            decode_step(*args)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--capacities", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a loaded machine's OpenMP "
                        "threads spin against each other)")
    parser.add_argument("--eager", action="store_true", help="also time the eager step (int column)")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("rows,capacity,backend,compile_s,ms_per_token")
    for capacity in a.capacities:
        compile_s, step_s = time_step(a.rows, capacity, a.backend, a.tokens)
        print(f"{a.rows},{capacity},{a.backend},{compile_s:.1f},{step_s * 1e3:.2f}", flush=True)
        if a.eager:
            print(f"{a.rows},{capacity},none,0,{time_eager(a.rows, capacity, a.tokens) * 1e3:.2f}", flush=True)


if __name__ == "__main__":
    main()
