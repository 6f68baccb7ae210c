#!/usr/bin/env bash
# The GPU check tested where it is written (CI, no GPU): builds the gpu-check/ folder, then
#  1. the dry run: `run all` walks every stage of both calls; each must record SKIP with a reason
#     (no device here), the summary must hold one line per stage, and it must take under 60 s;
#  2. the hang test: a stage made to hang (GPU_CHECK_TEST_HANG) is recorded as TIMEOUT and the
#     stage after it still runs and records its line.
# Exits non-zero naming the first thing that does not hold.
set -euo pipefail
cd "$(dirname "$0")/.."
fail() {
    echo "test-gpu-check: FAIL: $*" >&2
    exit 1
}

bash scripts/gpu-check.sh build
[[ -x gpu-check/nanoseek && -x gpu-check/cuda-tests ]] || fail "gpu-check/ lacks the binaries"
[[ -s gpu-check/train-step-reference ]] || fail "gpu-check/ lacks the training-step reference"

# every stage name of both calls, in order, without duplicates
mapfile -t stages < <(bash scripts/gpu-check.sh stages | awk -F'|' '/^  / { sub(/^  /, "", $1); if (!seen[$1]++) print $1 }')
((${#stages[@]} >= 20)) || fail "only ${#stages[@]} stages listed"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# 1. the dry run
t0=$(date +%s)
OUT=$out/dry bash gpu-check/scripts/gpu-check.sh run all >"$out/dry.log" 2>&1 || fail "run all exited $?: $(cat "$out/dry.log")"
secs=$(($(date +%s) - t0))
summary=$out/dry/summary.txt
for s in "${stages[@]}"; do
    line=$(grep -m 1 "^$s " "$summary" || true)
    [[ -n "$line" ]] || fail "stage $s has no summary line"
    read -r _ status _ reason <<<"$line"
    [[ $status == SKIP ]] || fail "stage $s recorded $status without a GPU: $line"
    [[ -n "$reason" ]] || fail "stage $s recorded SKIP without a reason"
done
((secs < 60)) || fail "the dry run took ${secs}s (must be well under a minute)"
echo "test-gpu-check: dry run: ${#stages[@]} stages, each SKIP with its reason, in ${secs}s"
sed 's/^/    /' "$summary"

# 2. the hang test: gemm sleeps past its timeout; cublaslt, the next stage, must still be recorded
OUT=$out/hang GPU_CHECK_TEST_HANG=gemm GPU_CHECK_TEST_HANG_TIMEOUT=2 \
    bash gpu-check/scripts/gpu-check.sh run smoke gemm cublaslt >"$out/hang.log" 2>&1 || fail "the hang run exited $?"
grep -q '^gemm  *TIMEOUT ' "$out/hang/summary.txt" || fail "the hung stage was not recorded as TIMEOUT: $(cat "$out/hang/summary.txt")"
grep -q '^cublaslt  *SKIP ' "$out/hang/summary.txt" || fail "the stage after the hung one did not run"
if pgrep -f 'sleep 1000' >/dev/null; then fail "the hung stage's process outlived its timeout"; fi
echo "test-gpu-check: hang test: the hung stage recorded TIMEOUT, the next stage ran"

size=$(du -sm gpu-check | cut -f1)
echo "test-gpu-check: gpu-check/ holds ${size} MiB (limit 40)"
