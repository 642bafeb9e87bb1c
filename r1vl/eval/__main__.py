"""python -m r1vl.eval: generate predictions for benchmark files with a checkpoint, then score them.

    python -m r1vl.eval --model PATH --bench MathVista=MathVista_MINI.tsv [--bench NAME=FILE ...] --out DIR
    torchrun --nproc_per_node 8 -m r1vl.eval --model PATH --bench ... --out DIR     # items split over ranks
    python -m r1vl.eval --score-only --bench NAME=FILE ... --out DIR [--judge URL]   # rescore DIR's predictions
    python -m r1vl.eval --score-only --bench NAME=FILE --predictions NAME=preds.jsonl --out DIR

Outputs under DIR: <Benchmark>/predictions.rank*.jsonl (as they come; a rerun resumes),
<Benchmark>/scored.jsonl, metrics.json, results.md (the paper's table with its numbers beside).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from r1vl.eval import benchmarks, protocols, vlmevalkit
from r1vl.eval.report import write_report
from r1vl.eval.tsv import EvalInputError, without_images

# Options that change the predictions: a resumed run must keep them, or its files would mix two settings.
_GENERATION_KEYS = ("protocol", "max_new_tokens", "max_pixels", "min_pixels")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m r1vl.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", action="append", required=True, metavar="NAME=FILE",
                   help=f"a benchmark and its VLMEvalKit TSV (R1VL: the trainer's JSONL); "
                        f"NAME one of {', '.join(benchmarks.BENCHMARKS)}")
    p.add_argument("--out", required=True, help="output directory (predictions, scores, report)")
    p.add_argument("--model", help="a local Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint directory (HF format)")
    p.add_argument("--score-only", "--score_only", dest="score_only", action="store_true",
                   help="score the predictions already in --out; no model is loaded")
    p.add_argument("--predictions", action="append", default=[], metavar="NAME=FILE",
                   help="with --score-only: score this file instead of the predictions in --out: JSONL "
                        "({index, prediction} per line) or VLMEvalKit's prediction TSV (xlsx: save it as TSV)")
    p.add_argument("--protocol", choices=protocols.PROTOCOLS, default="auto",
                   help="paper: the R1-VL authors' VLMEvalKit wrapper (their prompt, the text after 'The final "
                        "answer is:', HallusionBench asked as A: Yes / B: No); vlmevalkit: VLMEvalKit's dataset "
                        "prompts (what it sends models without custom prompts, its Qwen2.5-VL and Qwen3-VL "
                        "included), the whole output scored; qwen2vl: what VLMEvalKit sends Qwen2-VL (Qwen2VLChat's "
                        "own prompts: 'Please answer yes or no.' for HallusionBench, a short-answer suffix for VQA, "
                        "stripped MCQ prompts), the whole output scored; "
                        "auto: paper for R1-VL checkpoints, else vlmevalkit")
    p.add_argument("--fix", action="append", default=[], choices=sorted(vlmevalkit.FIXES), metavar="NAME",
                   help="correct one of VLMEvalKit's known bugs (default: follow it, as its leaderboard does): "
                        + "; ".join(f"{k}: {v}" for k, v in vlmevalkit.FIXES.items()))
    p.add_argument("--batch_size", type=int, default=8, help="prompts decoded together per rank")
    p.add_argument("--max_new_tokens", type=int, default=1024, help="completion length cap (the paper's 1024)")
    p.add_argument("--max_pixels", type=int, default=400000, help="images resized to at most this many pixels")
    p.add_argument("--min_pixels", type=int, default=3136)
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--skip_bad_rows", action="store_true",
                   help="skip (and count) malformed rows and unreadable images instead of stopping")
    p.add_argument("--judge", metavar="URL",
                   help="OpenAI-compatible endpoint asked where VLMEvalKit asks its GPT judge; without it those "
                        "items are counted as rule-only")
    p.add_argument("--judge_model", default="gpt-4o-mini")
    p.add_argument("--judge_api_key_env", default="OPENAI_API_KEY",
                   help="environment variable holding the judge's API key (sent only if set)")
    p.add_argument("--last", type=int, metavar="N",
                   help="R1VL records only: score the last N records (train.py's held-out --eval_prompts)")
    p.add_argument("--name", help="this model's row label in the table (default: the --model directory name)")
    p.add_argument("--progress", choices=("true", "false"), default="true")
    return p


def _benches(specs: list[str], option: str = "--bench") -> list[tuple[benchmarks.Benchmark, Path]]:
    out, seen = [], set()
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise ValueError(f"{option} {spec!r}: expected NAME=FILE")
        bench = benchmarks.get(name)
        if bench.name in seen:
            raise ValueError(f"{option}: {bench.name} given twice")
        seen.add(bench.name)
        out.append((bench, Path(file)))
    return out


def _check_settings(args, out: Path) -> None:
    """Refuse to resume with generation options other than those the predictions were made with."""
    path = out / "eval_config.json"
    now = {k: getattr(args, k) for k in _GENERATION_KEYS} | {"model": str(Path(args.model).resolve())}
    if "na-text" in args.fix:  # it changes the prompts; absent otherwise, as in files written before it existed
        now["na_text"] = True
    if path.exists():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v}
        if changed:
            raise ValueError(f"{out} holds predictions made with other settings {changed} (old, new); "
                             "use another --out, or the same options to resume")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(now, indent=2), encoding="utf-8")


def _protocol(args) -> str:
    """--protocol auto: the model's (r1vl.eval.protocols.resolve); with --score-only, the one the
    predictions in --out were made with (eval_config.json), else vlmevalkit."""
    if args.protocol != "auto" or not args.score_only:
        return protocols.resolve(args.protocol, args.model)
    config = Path(args.out) / "eval_config.json"
    if config.is_file():
        return json.loads(config.read_text(encoding="utf-8")).get("protocol", "vlmevalkit")
    return protocols.resolve("auto", args.model)


def run(args) -> str | None:
    """Everything but argument parsing and error printing; returns the markdown on rank 0."""
    from r1vl.eval.grading import score_benchmark
    from r1vl.eval.judge import Judge
    from r1vl.eval.trainer_api import check_checkpoint_dir, distributed

    if args.score_only and int(os.environ.get("RANK", "0")) > 0:
        return None  # scoring is one process's work; under torchrun the other ranks leave
    if not args.score_only and not args.model:
        raise ValueError("--model is required (or --score-only to score existing predictions)")
    args.protocol = _protocol(args)
    for name in ("batch_size", "max_new_tokens", "min_pixels"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    if args.max_pixels < args.min_pixels:
        raise ValueError("--max_pixels must be >= --min_pixels")
    benches = _benches(args.bench)
    out = Path(args.out)
    if not args.score_only:
        check_checkpoint_dir(args.model)
    if args.last is not None and args.last < 1:
        raise ValueError("--last must be >= 1")
    # Every file is checked before anything is generated; images are read again per benchmark.
    keep_na_text = "na-text" in args.fix
    tables = [without_images(benchmarks.load(bench, path, args.skip_bad_rows, args.last, keep_na_text))
              for bench, path in benches]
    world = None
    if not args.score_only:
        import torch

        from r1vl.eval.inference import generate_benchmark
        from r1vl.eval.trainer_api import load_policy

        world = distributed.init(args.device)
        if world.is_main:
            _check_settings(args, out)
        distributed.barrier()
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(
            args.dtype, torch.bfloat16 if world.device.type == "cuda" else torch.float32)
        policy = load_policy(args.model, dtype, world.device, args.min_pixels, args.max_pixels)
        for bench, path in benches:
            table = benchmarks.load(bench, path, args.skip_bad_rows, args.last, keep_na_text)
            generate_benchmark(policy, bench, table, out / bench.name, world, prompt=args.protocol,
                               batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                               max_pixels=args.max_pixels, min_pixels=args.min_pixels,
                               skip_bad_rows=args.skip_bad_rows, progress=args.progress == "true")
        # Scoring (and its judge calls) runs on rank 0 alone and may take long: the group
        # is closed first, so that no rank waits for it in a collective that could time out.
        distributed.destroy()
        if not world.is_main:
            return None
    judge = None
    if args.judge:
        judge = Judge(args.judge, model=args.judge_model, api_key=os.environ.get(args.judge_api_key_env) or None)
    sources = {bench.name: path for bench, path in _benches(args.predictions, "--predictions")}
    if sources and not args.score_only:
        raise ValueError("--predictions goes with --score-only")
    unknown = set(sources) - {bench.name for bench, _ in benches}
    if unknown:
        raise ValueError(f"--predictions for {sorted(unknown)}, which no --bench names")
    fixes = frozenset(args.fix)
    results = [score_benchmark(bench, table, out / bench.name, judge, args.protocol, sources.get(bench.name), fixes)
               for (bench, _), table in zip(benches, tables)]
    name = args.name or (Path(args.model).name if args.model else out.name)
    return write_report(results, out, name)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from r1vl.eval.trainer_api import distributed

    try:
        markdown = run(args)
    except (EvalInputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        distributed.destroy(wait_for_others=False)
        return 2
    if markdown is not None:
        print(markdown, end="")
    distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
