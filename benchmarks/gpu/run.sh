#!/usr/bin/env bash
# One prepared device check for npo_kernels on a lent H100 (torch 2.11, triton 3.6, repo copied, not installed,
# no network): the GPU tests of tests/kernels, then the selective_logprob and fused_linear_logprob benchmarks
# (and the policy_loss / group_advantages ones when their files exist), then the report with the targets.
# Each step has its own time limit; the whole script stays under 8 minutes.
#
#   bash benchmarks/gpu/run.sh                                   # results in $OUT (default benchmarks/results)
#   NPO_GPU_SMOKE=1 OUT=/tmp/smoke bash benchmarks/gpu/run.sh    # dry run on CPU with tiny shapes
#   NPO_GPU_PARTS="train" bash benchmarks/gpu/run.sh              # only some parts: tests bench train sync
#
# The `train` part runs GRPO and NPO-early on the demo task under `torchrun --nproc_per_node=1` (NCCL, FSDP2,
# bf16) for a few steps each: the engine end to end on CUDA, with each run's metrics and events.
#
# Outputs in $OUT, prefixed gpu_ (or smoke_): run.log, tests.txt, <suite>.json (pytest-benchmark layout),
# <suite>.txt (report table), report.txt (all suites + targets).
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
if [ "${NPO_GPU_SMOKE:-0}" != "0" ]; then TAG=smoke; else TAG=gpu; fi
LOG="$OUT/${TAG}_run.log"
: > "$LOG"
log() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }

# The repository is copied, not installed: kernels/ holds the package npo_kernels, and the repo root holds
# npo_engine and `benchmarks`.
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

python - <<'EOF' 2>&1 | tee -a "$LOG"
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no CUDA)")
try:
    import triton; print("triton", triton.__version__)
except ImportError as exc:
    print("triton missing:", exc)
import npo_kernels.logprob.op, npo_kernels.fused_linear.op
print("npo_kernels imports from", npo_kernels.__path__[0] if hasattr(npo_kernels, "__path__") else "?")
EOF

PARTS="${NPO_GPU_PARTS:-tests bench train sync}"
has_part() { case " $PARTS " in *" $1 "*) return 0;; *) return 1;; esac; }

HAVE_PYTEST=0; python -c "import pytest" 2>/dev/null && HAVE_PYTEST=1
HAVE_PLUGIN=0; python -c "import pytest_benchmark" 2>/dev/null && HAVE_PLUGIN=1
log "pytest: $HAVE_PYTEST, pytest-benchmark: $HAVE_PLUGIN (without it benchmarks/_shim.py stands in)"
# addopts are overridden: pyproject's --benchmark-disable needs the plugin, and the shim registers the option.
PYTEST=(python -m pytest -o addopts= --import-mode=importlib -q -rs -p no:cacheprovider)
[ "$HAVE_PLUGIN" = 1 ] || PYTEST+=(-p benchmarks._shim)

# 1. GPU tests (bf16 error budgets at real shapes, compile on/off, int64 offsets) of every kernel family.
if ! has_part tests; then
  log "tests skipped (NPO_GPU_PARTS=$PARTS)"
elif [ "$HAVE_PYTEST" = 1 ]; then
  log "tests: pytest tests/kernels -m gpu"
  timeout 130 "${PYTEST[@]}" tests/kernels -m gpu > "$OUT/${TAG}_tests.txt" 2>&1
  rc=$?
  tail -n 15 "$OUT/${TAG}_tests.txt" | tee -a "$LOG"
  # 5: nothing collected (no gpu-marked tests selected); 124: time limit.
  log "tests exit code $rc"
else
  log "tests skipped: pytest is not installed here"
fi

# 2. Benchmarks, one JSON and one table per suite.
run_suite() {   # name, file, time limit (s), [op for the pytest-free runner]
  local name=$1 file=$2 limit=$3 op=${4:-}
  has_part bench || return 0
  [ -f "$file" ] || { log "benchmark $name: $file absent, skipped"; return; }
  local json="$OUT/${TAG}_${name}.json"
  log "benchmark $name (limit ${limit}s)"
  if [ "$HAVE_PYTEST" = 1 ]; then
    timeout "$limit" "${PYTEST[@]}" "$file" --benchmark-enable --benchmark-json="$json" \
      > "$OUT/${TAG}_${name}_pytest.txt" 2>&1
  elif [ -n "$op" ]; then
    timeout "$limit" python -m benchmarks._shim "$op" "$json" > "$OUT/${TAG}_${name}_pytest.txt" 2>&1
  else
    log "benchmark $name needs pytest"; return
  fi
  local rc=$?
  tail -n 3 "$OUT/${TAG}_${name}_pytest.txt" | tee -a "$LOG"
  log "benchmark $name exit code $rc"
  [ -f "$json" ] && python -m benchmarks.report "$json" --out "$OUT/${TAG}_${name}.txt" > /dev/null
}
run_suite logprob benchmarks/test_bench_logprob.py 90 selective_logprob
run_suite fused_linear benchmarks/test_bench_fused_linear.py 160 fused_linear_logprob
run_suite policy_loss benchmarks/test_bench_policy_loss.py 45
run_suite group_advantages benchmarks/test_bench_group_advantages.py 25

# 3. The engine end to end on CUDA: GRPO and NPO-early on the demo task, a few steps each.
if has_part train; then
  if [ "${NPO_GPU_SMOKE:-0}" != "0" ]; then STEPS=3; EARLY=1; SFT=20; else STEPS=${NPO_GPU_TRAIN_STEPS:-40}; EARLY=$((STEPS / 4)); SFT=500; fi
  export NPO_CACHE_DIR="${NPO_CACHE_DIR:-$(mktemp -d)}"
  for run in grpo npo_early; do
    extra=(); [ "$run" = npo_early ] && extra=(--config configs/npo_early.yaml "npo.early_steps=$EARLY")
    log "train: $run, $STEPS steps (torchrun, 1 process)"
    timeout 200 torchrun --nproc_per_node=1 -m npo_engine.train "${extra[@]}" "run.steps=$STEPS" \
      "model.demo_sft_steps=$SFT" logging.progress=false logging.eval_every=20 data.eval_size=100 \
      --run-dir "$OUT/${TAG}_train_$run" > "$OUT/${TAG}_train_${run}.log" 2>&1
    log "train $run exit code $?"
    tail -n 3 "$OUT/${TAG}_train_${run}.log" | tee -a "$LOG"
  done
  python - "$OUT" "$TAG" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, statistics, sys
out, tag = sys.argv[1], sys.argv[2]
for run in ("grpo", "npo_early"):
    try:
        rows = [json.loads(line) for line in open(f"{out}/{tag}_train_{run}/metrics.jsonl")]
    except FileNotFoundError:
        print(run, "no metrics"); continue
    steps = [r["time/step"] for r in rows[2:]] or [r["time/step"] for r in rows]
    evals = [(r["step"], r["total_steps"], r["acc/eval"]) for r in rows if "acc/eval" in r]
    print(f"{run}: {len(rows)} rows, median time/step {statistics.median(steps):.3f} s, "
          f"guide slots {sum(r.get('guide/slots', 0) for r in rows):.0f}, evals (step, total, acc) {evals}")
PYEOF
fi

# 3b. Weight sync (npo_engine.sync): the csrc/ CPU + CUDA build (without nvcc the fallback runs, reported), CPU ==
# CUDA fingerprints, and a 7B-shaped bf16 engine filled from fp32 master weights (goal <= 0.5 s); then the
# gpu-marked csrc tests. Results: ${TAG}_sync.json and ${TAG}_sync.txt.
if has_part sync; then
  if [ "${NPO_GPU_SMOKE:-0}" != "0" ]; then SYNC_SHAPE=tiny; else SYNC_SHAPE=${NPO_GPU_SYNC_SHAPE:-7b}; fi
  export NPO_CACHE_DIR="${NPO_CACHE_DIR:-$(mktemp -d)}"  # the extension builds into it on first use
  log "sync: build csrc/, fingerprints CPU vs CUDA, $SYNC_SHAPE pack + hand-over"
  timeout 300 python -m benchmarks.gpu.bench_sync --shape "$SYNC_SHAPE" --out "$OUT" --tag "$TAG" \
    > "$OUT/${TAG}_sync.txt" 2>&1
  log "sync exit code $?"
  grep -E "^(device|ops|cuda_kernels_built|build_notes|fingerprint_|pack_|flipped|bucketed_s|bucketed_noverify_s|per_param_s|fingerprint_overhead|goal|engine_equals|sync_error|fingerprints_error)" \
    "$OUT/${TAG}_sync.txt" | tee -a "$LOG"
  if [ "$HAVE_PYTEST" = 1 ]; then
    timeout 120 "${PYTEST[@]}" tests/csrc > "$OUT/${TAG}_sync_tests.txt" 2>&1
    log "sync tests (tests/csrc) exit code $?: $(tail -n 1 "$OUT/${TAG}_sync_tests.txt")"
  fi
fi

# 4. One report over everything that produced JSON, with the targets.
jsons=()
for name in logprob fused_linear policy_loss group_advantages; do
  [ -f "$OUT/${TAG}_${name}.json" ] && jsons+=("$OUT/${TAG}_${name}.json")
done
if [ ${#jsons[@]} -gt 0 ]; then
  python -m benchmarks.report "${jsons[@]}" --targets --out "$OUT/${TAG}_report.txt" | tail -n 12 | tee -a "$LOG"
fi
log "done; results in $OUT"
