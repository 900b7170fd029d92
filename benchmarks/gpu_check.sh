#!/usr/bin/env bash
# The project's one GPU check (`make gpu-check`): on an H100/H200 machine, in one command,
#   build        the extension in place against that machine's python3 and torch (sm_90 only,
#                ptxas registers / spills in the build log);
#   tests        every CUDA test and every toolchain test (pytest -m "cuda or toolchain");
#   memcheck     compute-sanitizer memcheck over benchmarks/memcheck_ops.py, beside the tests;
#   bench-goals  the benchmark cases whose goal speaks of CUDA, timed with CUDA events;
#   racecheck, synccheck  over the ops whose kernels use shared memory, barriers, shuffles;
#   distributed  the data-parallel run's collectives on NCCL (benchmarks/bench_distributed.py);
#   bench-rest   the other benchmark cases;
#   finalize     benchmarks/gpu_finalize.py: one report, the logs bundled, the verdict.
# Build, tests and memcheck are mandatory: the check fails when one fails or does not finish.
# The later steps get the time that is left; a step or case left out for time is reported as
# "not run (time)" and does not fail the check. Each step has its own timeout cut from one
# overall budget, so the run ends in time even when a step hangs. Exit 0 only on a pass.
#
# What comes back, in $OUT (default benchmarks/results): gpu_report.json, gpu_check.log (this
# script's output) and logs.tar.gz (every step's log, the junit xml, the benchmark parts), 3
# files: the device machine returns at most 8, and the finalize step checks its limits.
#
# GPU_CHECK_DRY_RUN=1 rehearses every step on a machine without a GPU through the same code
# (CI runs it, through tests/test_gpu_check.py): the installed extension is reused, never
# rebuilt; the CUDA tests are collected and the toolchain tests run; each sanitizer's command
# is built and its ops script runs on the CPU, the tool itself being "not available"; every
# CPU-capable benchmark case runs once; the distributed step runs on gloo from a copy of the
# package with the editable install's finder disabled, as on the device where nothing is
# installed. The verdict then requires every step to have run and passed.
#
# Settings: PYTHON (default python3), GPU_CHECK_BUDGET_S (seconds for the whole run: default
# 450, 1500 in a dry run), GPU_CHECK_SKIP (step names to skip, e.g. "build" to reuse an in-place
# build), GPU_CHECK_PYTEST_ARGS (extra pytest arguments, e.g. "-k metrics" for a rerun),
# GPU_CHECK_ONLY (time only the cases whose name contains this text), GPU_CHECK_LARGE=1 (also
# time the cases marked large: the 1B-parameter snapshots, many GB and minutes).
set -uo pipefail  # no -e: a failing step must not stop the others

cd "$(dirname "$0")/.."
export ROOT=$PWD
export PYTHON=${PYTHON:-python3}
OUT_GIVEN=${OUT:+1}
export OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
SKIP=" ${GPU_CHECK_SKIP:-} "
WORK=$(mktemp -d)
export WORK LOGS=$WORK/logs
mkdir -p "$LOGS"
STEPS=$LOGS/steps.tsv
: >"$STEPS"

# Per step: the longest it may take, and (for the mandatory ones) the least time kept back for
# the steps after it, kill grace included. A dry run on a 2-core CPU machine is slower.
if [[ $DRY_RUN == 1 ]]; then
    BUDGET=${GPU_CHECK_BUDGET_S:-1500}
    BUILD_CAP=120 TESTS_CAP=600 MEMCHECK_CAP=300 BENCH_GOALS_CAP=400 RACECHECK_CAP=300 SYNCCHECK_CAP=300
    DISTRIBUTED_CAP=240 BENCH_REST_CAP=500
else
    BUDGET=${GPU_CHECK_BUDGET_S:-450}
    BUILD_CAP=200 TESTS_CAP=210 MEMCHECK_CAP=180 BENCH_GOALS_CAP=120 RACECHECK_CAP=60 SYNCCHECK_CAP=50
    DISTRIBUTED_CAP=45 BENCH_REST_CAP=150
fi
FINALIZE_S=30
GRACE_S=10
BENCH_GOALS_MIN=60

seconds_left() { echo $((BUDGET - SECONDS)); }

# run_step NAME CAP RESERVE COMMAND...: runs COMMAND under a timeout of at most CAP seconds
# that leaves RESERVE seconds of the budget, logs into $LOGS/NAME.log, records one line in
# $STEPS. Exit 77 from a step means "not available" (a dry run's sanitizer).
run_step() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local log=$LOGS/$name.log
    if [[ $SKIP == *" $name "* ]]; then
        echo "== $name: skipped (GPU_CHECK_SKIP)"
        printf '%s\tskipped\t0\t0\t0\t%s\n' "$name" "$(basename "$log")" >>"$STEPS"
        return 0
    fi
    local left limit
    left=$(( $(seconds_left) - reserve ))
    limit=$(( cap < left ? cap : left ))
    if (( limit < 10 )); then
        echo "== $name: not run (time): the budget is spent"
        printf '%s\tno-time\t-1\t0\t0\t%s\n' "$name" "$(basename "$log")" >>"$STEPS"
        return 1
    fi
    echo "== $name: started $(date -u +%T), timeout ${limit}s"
    local start=$SECONDS rc status
    STEP_TIMEOUT=$limit timeout -k "$GRACE_S" "$limit" "$@" </dev/null >>"$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        77) status=unavailable ;;
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
        --format=csv 2>/dev/null || echo "nvidia-smi: not available"
    "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
    (command -v nvcc || ls /usr/local/cuda/bin/nvcc) 2>/dev/null
    echo "compute-sanitizer: $(find_sanitizer || echo not found)"
    "$PYTHON" -c 'import pytest_timeout' 2>/dev/null && echo "pytest-timeout: present"
    echo "dry run: $DRY_RUN"
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
    (nvcc --version || /usr/local/cuda/bin/nvcc --version) 2>&1
    "$PYTHON" -c 'import torch; print("building against torch", torch.__version__, "CUDA", torch.version.cuda)'
    if [[ $DRY_RUN == 1 ]]; then
        # The running suite uses the installed extension: never delete or rebuild it here.
        echo "dry run: the installed extension is reused"
    else
        # A stale library from an earlier run must not stand in for a failed build.
        rm -f esper_fast/_C*.so
        # NVCC_APPEND_FLAGS reaches every nvcc call: ptxas prints registers, stack and spills per kernel.
        TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 ESPER_FAST_CUDA=1 NVCC_APPEND_FLAGS="-Xptxas -v" \
            "$PYTHON" setup.py build_ext --inplace || return $?
    fi
    "$PYTHON" - <<'EOF'
import os
import esper_fast
kernels = esper_fast.kernels_available()
path = esper_fast.extension_path()
print("extension:", path)
print("kernels:", kernels)
assert os.path.realpath(path).startswith(os.path.realpath(os.environ["ROOT"]) + os.sep), \
    f"the extension in use ({path}) is not this checkout's"
assert getattr(esper_fast._C, "cuda_compiled", 0) == 1, "the extension was built without CUDA"
assert kernels["cuda"], "no CUDA kernel is registered"
EOF
}

step_tests() {
    # The CUDA tests must be there to be run: count them first (a collection error fails here).
    local listing count markers="cuda or toolchain"
    listing=$("$PYTHON" -m pytest tests -m cuda --collect-only -q -p no:cacheprovider 2>&1) || {
        echo "$listing" | tail -n 40
        echo "gpu-check: collecting the CUDA tests failed"
        return 2
    }
    count=$(echo "$listing" | sed -nE 's/^([0-9]+)(\/[0-9]+)? tests? collected.*/\1/p' | tail -n 1)
    echo "gpu-check: ${count:-0} cuda tests collected"
    (( ${count:-0} > 0 )) || return 2
    # Without a GPU the CUDA tests would only skip: a dry run runs the toolchain tests alone.
    [[ $DRY_RUN == 1 ]] && markers="toolchain"
    local per_test=()
    "$PYTHON" -c 'import pytest_timeout' 2>/dev/null && per_test=(--timeout=120)
    "$PYTHON" -m pytest tests -m "$markers" -q -rfE -p no:cacheprovider --durations=15 \
        --junitxml="$LOGS/tests_junit.xml" "${per_test[@]}" ${GPU_CHECK_PYTEST_ARGS:-}
}

# sanitize TOOL [memcheck_ops.py arguments]: one compute-sanitizer tool over the ops script.
sanitize() {
    local tool=$1 sanitizer
    shift
    local ops=("$PYTHON" benchmarks/memcheck_ops.py "$@")
    # Without the caching allocator every tensor is its own allocation, so memcheck sees an
    # access past a tensor's end.
    local command=(--tool "$tool" --error-exitcode 3 --print-limit 100 "${ops[@]}")
    if [[ $DRY_RUN == 1 ]]; then
        echo "command: PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer ${command[*]}"
        echo "dry run: compute-sanitizer is not available; the ops script runs on the CPU"
        "${ops[@]}" --device cpu || return $?
        return 77
    fi
    if ! sanitizer=$(find_sanitizer); then
        echo "compute-sanitizer not found: the ops run without it, and the step fails"
        "${ops[@]}"
        return 3
    fi
    "$sanitizer" --version | tail -n 1
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" "${command[@]}"
}

step_memcheck() { sanitize memcheck; }

# Shared-memory hazards and barrier / shuffle misuse; slower tools, so only the kernels that
# have such things run under them.
step_racecheck() { sanitize racecheck --checks blend,metrics; }

step_synccheck() { sanitize synccheck --checks blend,metrics; }

# step_bench PART: the report script times the part's cases within the step's time and keeps
# what it measured; cases it cannot reach are "not run (time)".
step_bench() {
    local part=$1 args=(--device cuda)
    [[ $DRY_RUN == 1 ]] && args=(--device cpu --once)
    [[ ${GPU_CHECK_LARGE:-0} == 1 ]] && args+=(--include-large)
    "$PYTHON" benchmarks/gpu_report.py "${args[@]}" --part "$part" --out "$LOGS" --report-name "bench_$part.json" \
        --time-budget $((STEP_TIMEOUT - 15)) ${GPU_CHECK_ONLY:+--only "$GPU_CHECK_ONLY"}
}

# A copy of what the distributed step needs, and a sitecustomize that drops the editable
# install's import finder: the dry run then imports esper_fast as the device does, from the
# tree alone.
prepare_uninstalled_copy() {
    local copy=$WORK/copy
    mkdir -p "$copy" "$WORK/no-editable-finder"
    tar -C "$ROOT" --exclude='__pycache__' -cf - esper_fast benchmarks | tar -C "$copy" -xf -
    cat >"$WORK/no-editable-finder/sitecustomize.py" <<'EOF'
import sys
_editable = lambda hook: str(getattr(hook, "__module__", "")).startswith("__editable__")
sys.meta_path[:] = [finder for finder in sys.meta_path if not _editable(finder)]
sys.path_hooks[:] = [hook for hook in sys.path_hooks if not _editable(hook)]
sys.path_importer_cache.clear()
EOF
    echo "$copy"
}

step_distributed() {
    local root=$ROOT backend=nccl rounds=100
    if [[ $DRY_RUN == 1 ]]; then
        root=$(prepare_uninstalled_copy) backend=gloo rounds=5
        export PYTHONPATH=$WORK/no-editable-finder
        if (cd "$WORK" && "$PYTHON" -c 'import esper_fast' 2>/dev/null); then
            echo "gpu-check: esper_fast still imports outside the copy: the editable finder is not disabled"
            return 2
        fi
    fi
    # NCCL: the validation all-reduce, the stop agreement and the rollback (2 processes with 2
    # GPUs or more, else a process group of one); the epoch-scaling runs only on CPU.
    (cd "$root" && PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/bench_distributed.py \
        --backend "$backend" --rounds "$rounds" --skip-epochs --json "$LOGS/distributed.json") || return $?
    "$PYTHON" - "$LOGS/distributed.json" "$root" <<'EOF'
import json, os, sys
files = json.load(open(sys.argv[1]))["collectives"]["esper_fast_files"]
root = os.path.realpath(sys.argv[2]) + os.sep
outside = [f for f in files if not os.path.realpath(f).startswith(root)]
assert files and not outside, f"ranks imported esper_fast from outside {root}: {outside}"
print(f"gpu-check: {len(files)} rank(s) imported esper_fast from {root}")
EOF
}

export -f find_sanitizer sanitize step_build step_tests step_memcheck step_racecheck step_synccheck step_bench \
    prepare_uninstalled_copy step_distributed

main() {
    echo "esper_fast gpu-check: $(date -u +%FT%TZ), budget ${BUDGET}s, output $OUT$([[ $DRY_RUN == 1 ]] && echo ', DRY RUN')"
    timeout -k 5 30 bash -c "$(declare -f find_sanitizer step_environment); step_environment" 2>&1

    local after_mandatory=$((BENCH_GOALS_MIN + FINALIZE_S + 2 * GRACE_S))
    run_step build "$BUILD_CAP" $((after_mandatory + 60)) bash -c step_build

    # memcheck runs beside the tests: both are mostly host-bound, and the time is short.
    run_step memcheck "$MEMCHECK_CAP" "$after_mandatory" bash -c step_memcheck &
    local memcheck_pid=$!
    run_step tests "$TESTS_CAP" "$after_mandatory" bash -c step_tests
    wait "$memcheck_pid"

    # Timing runs alone on the card; then what is left of the budget, in order.
    run_step bench-goals "$BENCH_GOALS_CAP" $((FINALIZE_S + GRACE_S)) bash -c "step_bench goals"
    run_step racecheck "$RACECHECK_CAP" $((FINALIZE_S + GRACE_S)) bash -c step_racecheck
    run_step synccheck "$SYNCCHECK_CAP" $((FINALIZE_S + GRACE_S)) bash -c step_synccheck
    run_step distributed "$DISTRIBUTED_CAP" $((FINALIZE_S + GRACE_S)) bash -c step_distributed
    run_step bench-rest "$BENCH_REST_CAP" $((FINALIZE_S + GRACE_S)) bash -c "step_bench rest"

    echo "== finalize: $(date -u +%T), $SECONDS s elapsed"
    local finalize_args=(--out "$OUT" --logs "$LOGS")
    [[ $DRY_RUN == 1 ]] && finalize_args+=(--dry-run)
    [[ -n $OUT_GIVEN ]] && finalize_args+=(--whole-out)
    timeout -k 5 $((FINALIZE_S - 5)) "$PYTHON" benchmarks/gpu_finalize.py "${finalize_args[@]}"
    local rc=$?
    if (( rc > 1 )); then
        echo "finalize failed (rc $rc); the steps were:"
        cat "$STEPS"
        rc=2
    fi
    echo "gpu-check: $SECONDS s, exit $rc"
    return $rc
}

rm -f "$OUT"/{gpu_report.json,gpu_report.json.tmp,gpu_check.log,logs.tar.gz}
main 2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$status"
