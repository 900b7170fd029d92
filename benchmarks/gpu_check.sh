#!/usr/bin/env bash
# The project's one GPU check (`make gpu-check`): on an H100/H200 machine, in one command,
#   1. build the extension in place against that machine's python3 and torch (sm_90 only,
#      ptxas register/spill report in the build log),
#   2. run every CUDA test (pytest -m cuda) with a junit xml,
#   3. run compute-sanitizer over benchmarks/memcheck_ops.py beside step 2: memcheck over every
#      check, then racecheck and synccheck over the checks whose kernels use shared memory,
#      barriers and warp shuffles (blend, metrics),
#   4. time every benchmark case with CUDA events (benchmarks/gpu_report.py),
#   5. time the distributed run's collectives on NCCL (benchmarks/bench_distributed.py),
#   6. merge everything into gpu_report.json and print a short table last.
# Each step has its own timeout cut from one overall budget, so the whole run ends in time
# even when a step hangs; a failed step is recorded and the next steps still run. Exit 0 only
# when every step passed (performance goals are reported, not enforced).
#
# Output in $OUT (default benchmarks/results), 11 files: gpu_report.json, gpu_check.log (this
# script's output), build.log, tests.log, tests_junit.xml, memcheck.log, racecheck.log,
# synccheck.log, bench.log, distributed.log, distributed.json.
#
# Settings: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 450: seconds for the whole
# run), GPU_CHECK_SKIP (step names to skip, e.g. "build" to reuse an in-place build),
# GPU_CHECK_PYTEST_ARGS (extra pytest arguments, e.g. "-k metrics" for a rerun),
# GPU_CHECK_ONLY (time only the cases whose name contains this text).
set -uo pipefail  # no -e: a failing step must not stop the others

cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-python3}
export OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
BUDGET=${GPU_CHECK_BUDGET_S:-450}
SKIP=" ${GPU_CHECK_SKIP:-} "
WORK=$(mktemp -d)
STEPS=$WORK/steps.tsv
: >"$STEPS"

# Caps per step, and the least time kept back for the steps after it (kill grace included).
BUILD_CAP=240
TESTS_CAP=210
MEMCHECK_CAP=120
RACECHECK_CAP=70
SYNCCHECK_CAP=60
BENCH_CAP=200
DISTRIBUTED_CAP=45
TESTS_MIN=60
BENCH_MIN=60
FINALIZE_S=40
GRACE_S=10

seconds_left() { echo $((BUDGET - SECONDS)); }

# run_step NAME CAP RESERVE LOG COMMAND...: runs COMMAND under a timeout of at most CAP
# seconds that leaves RESERVE seconds of the budget, logs into LOG, records one line in STEPS.
run_step() {
    local name=$1 cap=$2 reserve=$3 log=$4
    shift 4
    if [[ $SKIP == *" $name "* ]]; then
        echo "== $name: skipped (GPU_CHECK_SKIP)"
        printf '%s\tskipped\t0\t0\t0\t%s\n' "$name" "$(basename "$log")" >>"$STEPS"
        return 0
    fi
    local left limit
    left=$(( $(seconds_left) - reserve ))
    limit=$(( cap < left ? cap : left ))
    if (( limit < 10 )); then
        echo "== $name: not run, the time budget is spent"
        printf '%s\tno-time\t-1\t0\t0\t%s\n' "$name" "$(basename "$log")" >>"$STEPS"
        return 1
    fi
    echo "== $name: started $(date -u +%T), timeout ${limit}s, log $(basename "$log")"
    local start=$SECONDS rc status
    STEP_TIMEOUT=$limit timeout -k "$GRACE_S" "$limit" "$@" </dev/null >>"$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - start))" "$limit" \
        "$(basename "$log")" >>"$STEPS"
    echo "== $name: $status (rc $rc, $((SECONDS - start)) s)"
    if [[ $status != ok ]]; then
        tail -n 25 "$log" | sed "s/^/   [$name] /"
    fi
    return $rc
}

step_environment() {
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
        --format=csv || echo "nvidia-smi: not available"
    "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
    (command -v nvcc || ls /usr/local/cuda/bin/nvcc) 2>/dev/null
    echo "compute-sanitizer: $(find_sanitizer || echo not found)"
    "$PYTHON" -c 'import pytest_timeout' 2>/dev/null && echo "pytest-timeout: present"
    return 0
}

find_sanitizer() {
    local candidate
    for candidate in "$(command -v compute-sanitizer)" /usr/local/cuda/bin/compute-sanitizer \
        /usr/local/cuda/compute-sanitizer/compute-sanitizer /opt/nvidia/compute-sanitizer/compute-sanitizer; do
        if [[ -n $candidate && -x $candidate ]]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

step_build() {
    # A stale library from an earlier run must not stand in for a failed build.
    rm -f esper_fast/_C*.so
    (nvcc --version || /usr/local/cuda/bin/nvcc --version) 2>&1
    "$PYTHON" -c 'import torch; print("building against torch", torch.__version__, "CUDA", torch.version.cuda)'
    # NVCC_APPEND_FLAGS reaches every nvcc call: ptxas prints registers, stack and spills per kernel.
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 ESPER_FAST_CUDA=1 NVCC_APPEND_FLAGS="-Xptxas -v" \
        "$PYTHON" setup.py build_ext --inplace || return $?
    "$PYTHON" - <<'EOF'
import esper_fast
kernels = esper_fast.kernels_available()
print("extension:", esper_fast.extension_path())
print("kernels:", kernels)
assert getattr(esper_fast._C, "cuda_compiled", 0) == 1, "the extension was built without CUDA"
assert kernels["cuda"], "no CUDA kernel is registered"
EOF
}

step_tests() {
    local per_test=()
    "$PYTHON" -c 'import pytest_timeout' 2>/dev/null && per_test=(--timeout=120)
    "$PYTHON" -m pytest tests -m cuda -q -rfE -p no:cacheprovider --durations=15 \
        --junitxml="$OUT/tests_junit.xml" "${per_test[@]}" ${GPU_CHECK_PYTEST_ARGS:-}
}

# sanitize TOOL [memcheck_ops.py arguments]: one compute-sanitizer tool over the ops script.
sanitize() {
    local tool=$1 sanitizer
    shift
    if ! sanitizer=$(find_sanitizer); then
        echo "compute-sanitizer not found: the ops run without it, and the step fails"
        "$PYTHON" benchmarks/memcheck_ops.py "$@"
        return 3
    fi
    "$sanitizer" --version | tail -n 1
    # Without the caching allocator every tensor is its own allocation, so memcheck sees
    # an access past a tensor's end.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 3 --print-limit 100 \
        "$PYTHON" benchmarks/memcheck_ops.py "$@"
}

step_memcheck() { sanitize memcheck; }

# Shared-memory hazards and barrier / shuffle misuse; slower tools, so only the kernels that
# have such things run under them.
step_racecheck() { sanitize racecheck --checks blend,metrics; }

step_synccheck() { sanitize synccheck --checks blend,metrics; }

step_bench() {
    # The report script spends at most this much on the cases and keeps what it measured.
    "$PYTHON" benchmarks/gpu_report.py --device cuda --out "$OUT" --time-budget $((STEP_TIMEOUT - 25)) \
        ${GPU_CHECK_ONLY:+--only "$GPU_CHECK_ONLY"}
}

step_distributed() {
    # NCCL: the validation all-reduce, the stop agreement and the rollback (2 processes with
    # 2 GPUs or more, else a process group of one); the epoch-scaling runs only on CPU.
    "$PYTHON" benchmarks/bench_distributed.py --backend nccl --rounds 100 --skip-epochs --json "$OUT/distributed.json"
}

export -f find_sanitizer sanitize step_build step_tests step_memcheck step_racecheck step_synccheck step_bench step_distributed

# The sanitizer steps one after the other (they share the GPU with the tests).
run_sanitizers() {
    local reserve=$1
    run_step memcheck "$MEMCHECK_CAP" "$reserve" "$OUT/memcheck.log" bash -c step_memcheck
    run_step racecheck "$RACECHECK_CAP" "$reserve" "$OUT/racecheck.log" bash -c step_racecheck
    run_step synccheck "$SYNCCHECK_CAP" "$reserve" "$OUT/synccheck.log" bash -c step_synccheck
    return 0
}

main() {
    echo "esper_fast gpu-check: $(date -u +%FT%TZ), budget ${BUDGET}s, output $OUT"
    timeout -k 5 30 bash -c "$(declare -f find_sanitizer step_environment); step_environment" 2>&1

    run_step build "$BUILD_CAP" $((TESTS_MIN + BENCH_MIN + FINALIZE_S + 2 * GRACE_S)) "$OUT/build.log" \
        bash -c step_build

    # The sanitizers run beside the tests: both are mostly host-bound, and the time is short.
    local reserve=$((BENCH_MIN + FINALIZE_S + GRACE_S)) sanitizers_pid
    run_sanitizers "$reserve" &
    sanitizers_pid=$!
    run_step tests "$TESTS_CAP" "$reserve" "$OUT/tests.log" bash -c step_tests
    wait "$sanitizers_pid"

    # Timing runs alone on the card.
    run_step bench "$BENCH_CAP" $((FINALIZE_S + 20)) "$OUT/bench.log" bash -c step_bench
    run_step distributed "$DISTRIBUTED_CAP" "$FINALIZE_S" "$OUT/distributed.log" bash -c step_distributed

    echo "== finalize: $(date -u +%T), $SECONDS s elapsed"
    timeout -k 5 $((FINALIZE_S - 10)) "$PYTHON" benchmarks/gpu_report.py --finalize --out "$OUT" \
        --steps "$STEPS" --build-log "$OUT/build.log" --junit "$OUT/tests_junit.xml" \
        --tests-log "$OUT/tests.log" --memcheck-log "$OUT/memcheck.log" \
        --racecheck-log "$OUT/racecheck.log" --synccheck-log "$OUT/synccheck.log"
    local rc=$?
    if (( rc > 1 )); then
        echo "finalize failed (rc $rc); the steps were:"
        cat "$STEPS"
        rc=2
    fi
    echo "gpu-check: $SECONDS s, exit $rc"
    return $rc
}

rm -f "$OUT"/{gpu_report.json,gpu_report.json.tmp,gpu_check.log,build.log,tests.log,tests_junit.xml,memcheck.log} \
    "$OUT"/{racecheck.log,synccheck.log,bench.log}
main 2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$status"
