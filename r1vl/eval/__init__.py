"""Score a checkpoint on the R1-VL paper's eight benchmarks: `python -m r1vl.eval`.

    python -m r1vl.eval --model PATH --bench MathVista=MathVista_MINI.tsv --bench MME=MME.tsv --out DIR
    torchrun --nproc_per_node 8 -m r1vl.eval --model PATH --bench ... --out DIR
    python -m r1vl.eval --score-only --bench MME=MME.tsv --out DIR [--judge URL]

Modules, one job each: `tsv` reads VLMEvalKit's benchmark TSVs and `jsonl` the trainer's own
data files as benchmark items, `benchmarks` knows each benchmark's columns, `protocols` how an
item is asked, `extract` finds the answer in a model's output, `verdicts` judges one prediction
and aggregates a file's verdicts each benchmark's own way, `grading` grades one benchmark's
predictions (protocol span, verdicts, judge, counts), `predictions` keeps the resumable JSONL,
`inference` drives the trainer's sampler over a benchmark's items, `judge` asks an
OpenAI-compatible endpoint, `report` writes the JSON and the markdown table; `trainer_api` is
the one place that imports the trainer's modules.
"""
