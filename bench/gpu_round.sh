#!/usr/bin/env bash
# One GPU session round: install carried wheels, build ostquant._C, run the CUDA tests (plus one
# compute-sanitizer memcheck pass over the CUDA kernel tests), run the benchmarks, print a summary.
#
#   bash bench/gpu_round.sh                 # everything
#   bash bench/gpu_round.sh --no-sanitizer  # skip the compute-sanitizer pass
#   bash bench/gpu_round.sh --no-bench      # build + tests only
#   bash bench/gpu_round.sh --quick         # fewer benchmark sizes
#   bash bench/gpu_round.sh --only-bench    # skip the tests (build still runs)
#   bash bench/gpu_round.sh --only-sanitizer  # build + the compute-sanitizer pass only
#   bash bench/gpu_round.sh --only-bench --benches gemm,attention   # a subset of benchmarks
#
# A device call is limited to 10 minutes: split a round, e.g. (1) --no-bench --no-sanitizer,
# (2) --only-sanitizer, (3) --only-bench --benches hadamard,quant,gemm, (4) --only-bench
# --benches attention,prefill,decode,breakdown (the build is incremental once done in a warm machine).
#
# Results (JSON, logs) go to $OUT when set (the device machine's output folder), else to
# bench/results (JSON) and bench/out (logs). Exits non-zero if the build or a test failed; the
# benchmarks still run after failed tests (their own correctness checks stop them on bad output).
set -uo pipefail
cd "$(dirname "$0")/.."

SANITIZER=1; BENCH=1; TESTS=1; QUICK=""
BENCHES="hadamard,quant,gemm,attention,prefill,decode,breakdown"
expect_benches=0
for a in "$@"; do
  if [ "$expect_benches" = 1 ]; then BENCHES="$a"; expect_benches=0; continue; fi
  case "$a" in
    --only-sanitizer) TESTS=0; BENCH=0; SANITIZER=1 ;;
    --benches) expect_benches=1 ;;
    --no-sanitizer) SANITIZER=0 ;;
    --no-bench) BENCH=0 ;;
    --only-bench) TESTS=0; SANITIZER=0 ;;
    --quick) QUICK="--quick" ;;
    -h|--help) sed -n 2,19p "$0"; exit 0 ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done

LOG_DIR="${OUT:-bench/out}"
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
PY=python3
status=0
t0=$(date +%s)
say() { echo; echo "=== [$(( $(date +%s) - t0 ))s] $*"; }

# 1. carried wheels (device README: they go to a --target dir on PYTHONPATH)
if compgen -G ".whl/*.whl" > /dev/null; then
  say "installing carried wheels: $(ls .whl | tr '\n' ' ')"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# 1b. the fast_hadamard_transform baseline, if its source was carried (bench/build_fht.py)
if [ "$BENCH" = 1 ] && [ -f /tmp/fht/build/fast_hadamard_transform_cuda.so ]; then
  echo "fast_hadamard_transform baseline already built in /tmp/fht"
  export PYTHONPATH=/tmp/fht/build:/tmp/fht/src/fast-hadamard-transform${PYTHONPATH:+:$PYTHONPATH}
elif [ "$BENCH" = 1 ] && [ -f .whl/fast-hadamard-transform-src.tar.gz ]; then
  say "building the fast_hadamard_transform baseline (sm_90a; one big file, ~3 min)"
  if MAX_JOBS="${MAX_JOBS:-16}" $PY bench/build_fht.py .whl/fast-hadamard-transform-src.tar.gz \
      /tmp/fht > "$LOG_DIR/build-fht.log" 2>&1; then
    export PYTHONPATH=/tmp/fht/build:/tmp/fht/src/fast-hadamard-transform${PYTHONPATH:+:$PYTHONPATH}
    echo "fast_hadamard_transform baseline ok"
  else
    tail -20 "$LOG_DIR/build-fht.log"; echo "fast_hadamard_transform baseline build failed (bench goes on without it)"
  fi
fi

# 2. build
say "nvidia-smi"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
say "building ostquant._C"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
tb=$(date +%s)
if ! TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}" \
    $PY -m pip install --no-build-isolation --no-deps -e . > "$LOG_DIR/build.log" 2>&1; then
  tail -40 "$LOG_DIR/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build ok in $(( $(date +%s) - tb ))s"
$PY -c "import ostquant.ops as O; print('extension:', O.extension_loaded(), O.extension_error() or ''); print('cuda ops:', O.cuda_ops())"

# 3. tests
if [ "$TESTS" = 1 ]; then
  say "pytest -m cuda"
  $PY -m pytest -q -m cuda -p no:cacheprovider 2>&1 | tee "$LOG_DIR/pytest-cuda.log" | tail -30
  rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { echo "CUDA TESTS FAILED (rc=$rc)"; status=1; }
fi
if [ "$SANITIZER" = 1 ]; then
  say "compute-sanitizer memcheck on the CUDA kernel tests"
  SAN=$(command -v compute-sanitizer || true)
  [ -n "$SAN" ] || { [ -x "$CUDA_HOME/bin/compute-sanitizer" ] && SAN="$CUDA_HOME/bin/compute-sanitizer"; }
  if [ -n "$SAN" ]; then
    "$SAN" --tool memcheck --error-exitcode 99 --print-limit 20 \
        $PY -m pytest -q -x -m cuda -p no:cacheprovider tests/test_cuda_hadamard.py \
        tests/test_cuda_quant.py tests/test_cuda_fused_quant.py tests/test_cuda_gemm.py tests/test_cuda_kv.py \
        -k "not long_rows and not model_shapes and not llama3 and not matches_cpu_reference_op" \
        > "$LOG_DIR/sanitizer.log" 2>&1
    rc=$?
    tail -15 "$LOG_DIR/sanitizer.log"
    if grep -q "Device not supported" "$LOG_DIR/sanitizer.log"; then
      echo "compute-sanitizer cannot run on this machine's runtime (gVisor?); not a test failure"
    elif [ "$rc" != 0 ]; then
      echo "SANITIZER/TESTS FAILED (rc=$rc)"; status=1
    fi
  else
    echo "compute-sanitizer not found; skipped"
  fi
fi

# 4. benchmarks
if [ "$BENCH" = 1 ]; then
  for b in ${BENCHES//,/ }; do
    say "bench.$b $QUICK"
    $PY -m bench.$b $QUICK 2>&1 | tee "$LOG_DIR/bench-$b.log" | tail -60
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "BENCH $b FAILED"; status=1; }
  done
fi

# 5. summary
say "summary"
$PY - "$LOG_DIR" <<'PYEOF'
import glob, json, os, sys
out = os.environ.get("OUT") or "bench/results"
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    doc = json.load(open(path))
    m, rows = doc["meta"], doc["rows"]
    print(f"{os.path.basename(path)}: {m['device']}, torch {m['torch']}, commit {m['commit']}, "
          f"{len(rows)} rows")
    if m["bench"] == "hadamard":
        for r in rows:
            if r.get("speedup") is not None:
                print(f"  n={r['n']:>6} batch={r['batch']:>5} {r['dtype']:>8} vs {r['baseline']:>5}: "
                      f"ours {r['ours_ms']:.4f} ms ({r['ours_gbps']:.0f} GB/s), speedup "
                      f"{r['speedup']:.2f}x")
    elif m["bench"] == "gemm":
        for r in rows:
            if r["baseline"] == "bf16":
                print(f"  {r['op']:>5} {r['model']:>11} {r['layer']:>13} M={r['M']:>5}: "
                      f"ours {r['ours_ms']:.4f} ms ({r['ours_tops']:.0f} TOPS), bf16 "
                      f"{r['baseline_ms']:.4f} ms, speedup {r['speedup']:.2f}x")
    elif m["bench"] == "attention":
        for r in rows:
            sp = f"{r['speedup']:.2f}x" if r.get("speedup") is not None else "n/a"
            print(f"  {r['phase']:>14} {r['model']:>9} B={r['batch']:>2} ctx={r['context']:>5}: "
                  f"ours {r['ours_ms']:.4f} ms vs {r['baseline']} {r.get('baseline_ms') or 0:.4f} ms = {sp}")
    elif m["bench"] == "prefill":
        for r in rows:
            print(f"  {r['model']:>11} seq={r['seqlen']:>5}: ours {r['ours_ms']} ms, bf16 "
                  f"{r['baseline_ms']} ms, speedup {r['speedup']}, memory saving "
                  f"{r['memory_saving']}")
    elif m["bench"] == "decode":
        for r in rows:
            print(f"  {r['model']:>11} layers={r['layers']}/{r['full_layers']} "
                  f"batch={r['batch']:>2}: ours {r['ours_tok_s']} tok/s, bf16 "
                  f"{r['baseline_tok_s']} tok/s, speedup {r['speedup']}")
    elif m["bench"] == "breakdown":
        cats = ("gemm", "act_quant", "hadamard", "attention", "kv_append", "other")
        for r in rows:
            if r.get("layer_ms") is None:
                print(f"  {r['model']:>11} {r['phase']:>7} B={r['batch']:>2}: {r.get('error')}")
                continue
            print(f"  {r['model']:>11} {r['phase']:>7} B={r['batch']:>2}: layer "
                  f"{r['layer_ms']:.4f} ms (busy {r['busy_fraction']:.2f}): " +
                  ", ".join(f"{c} {r[c + '_pct']:.0f}%" for c in cats))
    elif m["bench"] == "quant":
        for r in rows:
            print(f"  {r['op']:>18} M={r['M']:>6} K={r['K']:>5}: {r['gbps']:.0f} GB/s = "
                  f"{r['fraction_of_copy']:.2f} of copy")
PYEOF
say "done (status $status)"
exit $status
