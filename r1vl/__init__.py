"""r1vl: StepGRPO (R1-VL) for Qwen2-VL; `train.py` at the repository root is the trainer.

The pipeline as folders, bottom up: data (records, prompts, the synthetic task), model (the
policy and its packed attention), sampling (step 1, the rollout), rewards (steps 2 and 3,
scores and advantages), update (step 4, packing, losses and the engines), run (step 5 and
around the loop: setup, checkpoints, metrics, the memory plan), eval (checkpoint evaluation),
tools (offline tools that prepare files). The words they share: docs/glossary.md.

Modules that are also command-line tools (`python -m NAME --help`): r1vl.tools.keysteps (fill a
data file's key steps), r1vl.data.synthetic (write the synthetic task), r1vl.run.plot (draw a
run's curves), r1vl.eval (evaluate a checkpoint).
"""
