"""The compiled decode step's time per token at two cache capacities, in the first column
bucket (32 columns read): with the KV column written in place the two are equal; a step that
copies the whole cache at each token grows with the capacity (max_new_tokens).

    python benchmarks/bench_decode_step.py [--rows 64] [--capacities 32 256] [--before OLD_decode.py]

The tiny built-in model (r1vl.tiny: 4 layers, 2 KV heads of 32) on the CPU, fp32, random cache
contents; one compile per capacity (and version; inductor: tens of seconds each on a CPU),
then --rounds rounds timing --tokens steps of each case in turn (interleaved: a shared
machine's load hits all alike). Prints one CSV row per case: median and fastest step.
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


def _step_function(path: str | None):
    """decode_step from this checkout, or from another decode.py (--before: e.g. the previous
    commit's, `git show REV:r1vl/sampling/decode.py > FILE`), loaded as its own module."""
    if not path:
        return decode_step
    import importlib.util
    spec = importlib.util.spec_from_file_location("decode_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.decode_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--capacities", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--tokens", type=int, default=20, help="timed steps per round and case")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, the cases interleaved in each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a loaded machine's OpenMP "
                        "threads spin against each other)")
    parser.add_argument("--before", default="", help="also time the decode_step of this decode.py")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    versions = {"current": decode_step} | ({"before": _step_function(a.before)} if a.before else {})
    cases = {}
    # Each capacity its own static graph (no automatic dynamic shapes on the second compile).
    with torch.no_grad(), torch._dynamo.config.patch(specialize_int=True, automatic_dynamic_shapes=False,
                                                     recompile_limit=64):
        for version, fn in versions.items():
            for capacity in a.capacities:
                _, args = tiny_step_inputs(a.rows, capacity)
                step = torch.compile(fn, backend=a.backend, fullgraph=True)
                start = time.perf_counter()
                step(*args)
                cases[version, capacity] = (step, args, time.perf_counter() - start, [])
        for _ in range(a.rounds):
            for step, args, _, times in cases.values():
                for _ in range(a.tokens):
                    start = time.perf_counter()
                    step(*args)
                    times.append(time.perf_counter() - start)
    print(f"# load average after {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("version,rows,capacity,backend,compile_s,ms_per_token_median,ms_per_token_min")
    for (version, capacity), (_, _, compile_s, times) in cases.items():
        print(f"{version},{a.rows},{capacity},{a.backend},{compile_s:.1f},{statistics.median(times) * 1e3:.2f},"
              f"{min(times) * 1e3:.2f}")


if __name__ == "__main__":
    main()
