#!/usr/bin/env bash
# On a GPU machine without network access (a borrowed one): the GPU tests, the loss kernels'
# benchmark suite and the end-to-end trainer benchmark, results copied to $OUT when it is set. Uses
# the machine's own python3 with torch and triton; packages it lacks (liger-kernel,
# pytest-timeout, pytest-benchmark and its py-cpuinfo, ...) come as wheels in .whl/ (pip
# download ... -d .whl) and are installed to /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Without installing: r1vl from the root, r1vl_kernels from kernels/ (its source root).
export PYTHONPATH=$PWD/kernels:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests 2>&1 | tee /tmp/gpu_tests.log
# The loss kernels' suite, every case (the CPU ones too: a minute): grouped tables in the log,
# every row with its extra_info in the JSON (the results file; compare it with
# `pytest benchmarks/ --benchmark-only --benchmark-compare=PATH`, see the README). Extra
# pytest-benchmark options pass through BENCH_OPTS, e.g. BENCH_OPTS=--benchmark-max-time=0.25.
python3 -m pytest benchmarks/ --benchmark-only -p no:cacheprovider --benchmark-columns=median,iqr,min,rounds \
  --benchmark-json=/tmp/loss_kernels.json ${BENCH_OPTS:-} 2>&1 | tee /tmp/bench.log
# The sampler (current vs HF generate vs the fast one, 64 x 1024 tokens, the step compiled and
# CUDA-graphed) and the update with and without shared prompts, Qwen2-VL-2B-shaped in bf16.
python3 benchmarks/bench_rollout.py --shape 2b 2>&1 | tee /tmp/bench_rollout.log
python3 benchmarks/bench_update.py --model 2b 2>&1 | tee /tmp/bench_update.log
# End to end against TRL's GRPOTrainer, Qwen2-VL-2B-shaped in bf16 (TRL's side is skipped when
# trl is missing). Its wheels in .whl/ besides the ones above: trl, accelerate, datasets and
# what datasets needs (pyarrow, pandas, dill, multiprocess, xxhash, fsspec), plus
# transformers, tokenizers, safetensors, huggingface-hub where the machine lacks them.
python3 benchmarks/bench_trainer.py --shape 2b "$@" 2>&1 | tee /tmp/bench_trainer.log
# TRL's loss step with and without r1vl_kernels.trl (peak memory; needs trl like the above).
python3 benchmarks/bench_trl_loss.py 2>&1 | tee /tmp/bench_trl_loss.log
if [ -n "${OUT:-}" ]; then
  cp /tmp/gpu_tests.log /tmp/bench.log /tmp/loss_kernels.json /tmp/bench_rollout.log /tmp/bench_update.log /tmp/bench_trainer.log /tmp/bench_trl_loss.log benchmarks/results/*.csv "$OUT"/ 2>/dev/null
fi
