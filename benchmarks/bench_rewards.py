"""The answer check under hostile input, and the normalizer's cost per MB.

    python benchmarks/bench_rewards.py                       # 32 towers + 32 honest, 2 workers, 0.5 s budget
    python benchmarks/bench_rewards.py --hostile 32 --honest 32 --workers 2 --timeout 0.5

1. Hostile batch: `--hostile` exponent towers (9^{9^{9^9}} and the like, each a
   distinct answer) scored together with `--honest` honest completions whose verdicts need
   math-verify, hostile ones first and then interleaved. Prints the honest verdicts alone
   and together (they must be identical), the wall time of each batch, and the bound
   ceil(U / workers) * (timeout + 0.02 s) for U distinct checks on free cores.
2. normalize_math: CPU milliseconds per MB on a few kinds of text.

CPU only; timings depend on how busy the machine is (say so when quoting them).
"""
import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from r1vl.rewards import RewardConfig, SymbolicVerifier, normalize_math, score  # noqa: E402


class Ex:
    def __init__(self, solution):
        self.solution, self.key_steps = solution, ()


def completion(answer):
    return ("### Image Description:\nd\n### Rationales:\nr\n### Let's think step by step.\n"
            "### Step 1:\ns\n### The final answer is:\n" + answer)


def honest_pair(k):
    """The k-th honest (answer, reference) pair, all distinct, each needing math-verify."""
    forms = [(f"{k}.0", f"{k}"), (f"\\frac{{{2 * k}}}{{4}}", f"{k / 2}"), (f"x = {k}", f"{k}"),
             (f"{k + 1}, {k}", f"{k}, {k + 1}"), (f"{k + 1}.0", f"{k}"), (f"\\sqrt{{{k * k}}}", f"{k}")]
    return forms[k % len(forms)]  # the fifth form is wrong, the others right


def hostile_batch(args):
    honest = [(completion(a), Ex(completion(g))) for a, g in map(honest_pair, range(1, args.honest + 1))]
    hostile = [(completion(f"${b}^{{{b}^{{{b}^{{{b}}}}}}}$"), Ex(completion("1")))
               for b in range(3, 3 + args.hostile)]
    cfg = RewardConfig()
    with SymbolicVerifier(num_workers=args.workers, timeout_s=args.timeout, cache_size=0) as v:
        score([completion("6.0")], [Ex(completion("6"))], cfg, v)  # start the workers
        start = time.perf_counter()
        alone = score(*zip(*honest), cfg, v)
        t_alone = time.perf_counter() - start
        print(f"honest alone: {len(honest)} completions, {alone.accuracy.sum():.0f} correct, "
              f"{alone.undecided.sum()} undecided, {t_alone:.2f} s")
        interleaved = [x for pair in zip(hostile, honest) for x in pair]
        interleaved += hostile[len(honest):] + honest[len(hostile):]
        for name, batch in [("hostile first", hostile + honest), ("interleaved", interleaved)]:
            start = time.perf_counter()
            b = score(*zip(*batch), cfg, v)
            elapsed = time.perf_counter() - start
            idx = [i for i, item in enumerate(batch) if item in honest]
            same = b.accuracy[idx].tolist() == alone.accuracy.tolist()
            u = len(batch)
            bound = math.ceil(u / args.workers) * (args.timeout + 0.02)
            print(f"{name}: {len(hostile)} hostile + {len(honest)} honest, honest verdicts "
                  f"{'identical to' if same else 'DIFFERENT from'} alone, "
                  f"{int(b.undecided[idx].sum())} honest undecided, "
                  f"{int(b.undecided.sum()) - int(b.undecided[idx].sum())}/{len(hostile)} hostile "
                  f"undecided, {elapsed:.2f} s (bound on free cores {bound:.2f} s)")


def normalizer():
    mb = 1 << 20
    texts = {"LaTeX prose": "BD = 12/2 = 6, so x = 6.0 and the area is \\frac{1}{2} bh. " * (mb // 60),
             "words": "the quick brown fox " * (mb // 20), "one letter": "x" * mb,
             "digits": "1" * mb, "decimals": "1." * (mb // 2), "\\frac{ runs": "\\frac{" * (mb // 6)}
    for name, text in texts.items():
        best = min(_cpu(lambda: normalize_math(text)) for _ in range(3))
        print(f"normalize_math, {name}: {best * 1e3:.0f} ms of CPU per MB")


def _cpu(fn):
    start = time.process_time()
    fn()
    return time.process_time() - start


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hostile", type=int, default=32)
    parser.add_argument("--honest", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=0.5, help="CPU seconds per check")
    args = parser.parse_args()
    hostile_batch(args)
    normalizer()
