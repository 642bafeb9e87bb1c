#!/usr/bin/env bash
# One GPU session (a borrowed machine, no network, about 10 minutes): figures, not a first crash.
#
#   OUT=/some/empty/dir bash benchmarks/gpu_session.sh            # on the GPU machine
#   GPU_SESSION_DRY=1 OUT=dir bash benchmarks/gpu_session.sh       # anywhere: checks the steps
#
# Every step writes its log straight into $OUT (a timeout loses nothing written so far) under
# its own time limit, and adds one line to $OUT/steps.tsv: name, exit status, seconds. The
# preflight (versions, one compiled decode step) runs first and stops the session when it fails.
# Wheels the machine lacks (transformers 5.25 and its dependencies, pytest-timeout,
# pytest-benchmark, ...: docs/benchmarks.md) come in .whl/ and are installed to a site dir.
# The dry mode runs the preflight on the CPU (backend eager), checks that every step's script
# and test files exist, and writes each step's command into its log instead of running it.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${GPU_SESSION_DRY:-0}
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-benchmarks/results/gpu_session}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
: > "$OUT/steps.tsv"
failed=0  # the session's exit status: 1 when any step failed or timed out (status 124)

SITE=${GPU_SESSION_SITE:-$HOME/.r1vl_site}
if [ "$DRY" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl > "$OUT/wheels.log" 2>&1 \
    || { echo "wheels: install failed (see wheels.log)"; exit 1; }
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
# Without installing: r1vl from the root, r1vl_kernels from kernels/ (its source root).
export PYTHONPATH=$PWD/kernels:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$OUT/.inductor_cache}

# step NAME SECONDS FILES... -- COMMAND...: COMMAND under `timeout SECONDS`, its output in
# $OUT/NAME.log. FILES: what the command needs (checked in the dry mode).
step() {
  local name=$1 limit=$2; shift 2
  local files=()
  while [ "$1" != "--" ]; do files+=("$1"); shift; done
  shift
  local start=$SECONDS rc
  for f in "${files[@]}"; do
    [ -e "$f" ] || { echo "$name: missing $f" | tee "$OUT/$name.log"; printf '%s\t%s\t%s\n' "$name" missing 0 >> "$OUT/steps.tsv"; failed=1; return 1; }
  done
  if [ "$DRY" = 1 ]; then
    # The command's form, checked without running it: pytest collects what it would run (at
    # least one test, no collection error); a script's --help names every --option it gets.
    echo "dry: timeout $limit $*" > "$OUT/$name.log"
    if [ "$2" = "-m" ] && [ "$3" = "pytest" ]; then
      timeout 300 "$@" --collect-only -q >> "$OUT/$name.log" 2>&1
      rc=$?
    else
      local help
      help=$(timeout 120 "$1" "$2" --help 2>&1)
      rc=$?
      for arg in "${@:3}"; do
        case $arg in
          --*) grep -q -- "${arg%%=*}" <<< "$help" || { echo "dry: $2 has no option $arg" >> "$OUT/$name.log"; rc=1; } ;;
        esac
      done
    fi
    [ "$rc" = 0 ] && rc=dry
  else
    echo "\$ $*" > "$OUT/$name.log"
    timeout --kill-after=10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
    rc=$?
  fi
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$OUT/steps.tsv"
  echo "$name: $rc in $((SECONDS - start)) s"
  case $rc in 0|dry) ;; *) failed=1 ;; esac
}

# 1. Preflight, about 20 s: versions (transformers >= 5.25), one compiled decode step.
if [ "$DRY" = 1 ]; then
  echo "\$ $PY benchmarks/gpu_preflight.py --device cpu --backend eager" > "$OUT/preflight.log"
  timeout 300 "$PY" benchmarks/gpu_preflight.py --device cpu --backend eager >> "$OUT/preflight.log" 2>&1
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/nvidia-smi.log" 2>&1
  echo "\$ $PY benchmarks/gpu_preflight.py" > "$OUT/preflight.log"
  timeout 60 "$PY" benchmarks/gpu_preflight.py >> "$OUT/preflight.log" 2>&1
fi
rc=$?
printf '%s\t%s\t%s\n' preflight "$rc" "$SECONDS" >> "$OUT/steps.tsv"
cat "$OUT/preflight.log"
[ "$rc" = 0 ] || { echo "preflight failed: stopping"; exit 1; }

# 2. The GPU tests (trl / datasets missing: their module skips).
step gpu_tests 100 tests/conftest.py -- "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" -x tests
# 3. The loss kernels at the paper's shapes only (16384 tokens; Qwen2-VL's vocabulary and
# 2B's width), forward + backward, no torch.compile provider (its compiles would take the
# step's time): 16 cases, every row with its extra_info in loss_kernels.json.
step loss_kernels 80 benchmarks/test_bench_grpo_loss.py benchmarks/test_bench_grpo_loss_from_hidden.py -- \
  "$PY" -m pytest benchmarks/ --benchmark-only -p no:cacheprovider -o addopts="" \
  -k "cuda and N16384 and (V151936 or H1536) and fwd+bwd and not torch_compile" \
  --benchmark-columns=median,iqr,min,rounds \
  --benchmark-max-time=0.25 --benchmark-json="$OUT/loss_kernels.json"
# 4. The sampler, 2B-shaped, quick (a quarter of the tokens, one round), the compiled step
# warmed up over the whole measured length; peak memory in its table.
step rollout 110 benchmarks/bench_rollout.py -- "$PY" benchmarks/bench_rollout.py --shape 2b --quick --providers fast --no-save
# 5. The update, 2B-shaped: one round, one step; max_memory_allocated beside the plan.
step update 80 benchmarks/bench_update.py -- "$PY" benchmarks/bench_update.py --model 2b --rounds 1 --steps 1 --no-save
# 6. End to end, 2B-shaped, one measured step (TRL's side skipped where trl is missing).
step trainer 110 benchmarks/bench_trainer.py -- "$PY" benchmarks/bench_trainer.py --shape 2b --quick --no-save
cp benchmarks/results/*.csv "$OUT"/ 2>/dev/null
echo "logs in $OUT (steps.tsv: name, exit status, seconds)"
exit $failed
