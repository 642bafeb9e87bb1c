"""Score a checkpoint on the R1-VL paper's eight benchmarks: `python -m r1vl.eval`.

    python -m r1vl.eval --model PATH --bench MathVista=MathVista_MINI.tsv --bench MME=MME.tsv --out DIR
    torchrun --nproc_per_node 8 -m r1vl.eval --model PATH --bench ... --out DIR
    python -m r1vl.eval --score-only --bench MME=MME.tsv --out DIR [--judge URL]

Modules, one job each: `tsv` reads VLMEvalKit's benchmark TSVs, `benchmarks` knows each
benchmark's columns and prompt, `extract` finds the answer in a model's output,
`metrics` scores each benchmark its own way, `predictions` keeps the resumable JSONL,
`generate` drives the trainer's sampler, `judge` asks an OpenAI-compatible endpoint,
`report` writes the JSON and the markdown table; `trainer_api` is the one place that
imports the trainer's modules.
"""
