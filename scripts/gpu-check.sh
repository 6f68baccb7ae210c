#!/usr/bin/env bash
# The GPU check in two halves (../shared/docs/ENGINEERING.md section 2, docs/gpu-runs/README.md):
#
#   scripts/gpu-check.sh build
#       on a machine without a GPU: release build; gather the stripped nanoseek binary, the CUDA
#       test executable, scripts/, the CPU reference of the training-step check and the
#       compute-sanitizer wheel into gpu-check/ (kept under 40 MiB).
#   scripts/gpu-check.sh run first|second|all|STAGE...
#       on the GPU machine, from inside gpu-check/ (no Rust, no network). Each stage runs in its
#       own process under its own timeout and appends one line to $OUT/summary.txt as it ends:
#           <stage> <PASS|FAIL|TIMEOUT|SKIP> <seconds>s <key figure or reason>
#       so a stage that hangs or crashes loses only itself. `first` (about 4 minutes) is the
#       machine facts and every parity check; `second` (about 4 minutes) the benches and a short
#       training run. A call stops starting stages when its budget (GPU_CHECK_BUDGET_S) is spent
#       and records the rest as SKIP.
#   scripts/gpu-check.sh stages
#       lists the stages of each call with their timeouts.
#
# Environment: OUT (default ./out), GPU_CHECK_BUDGET_S (default 230 per call), and for the dry
# run's hang test GPU_CHECK_TEST_HANG=<stage> (that stage sleeps instead of running) with
# GPU_CHECK_TEST_HANG_TIMEOUT (its timeout, default 3 s).
set -euo pipefail

# The sanitizer wheel carried to the GPU machine (CUDA 13.0, the driver's version).
SANITIZER_WHEEL=nvidia-cuda-sanitizer-api==13.0.85
MAX_MIB=40

# ---- stage tables: name, timeout in seconds, command (run by bash in the folder) ----
# Parity groups are `nanoseek selftest` groups (`nanoseek selftest --list`); selftest exits 77
# when there is no device, which records SKIP.
FIRST_STAGES=(
    "machine|20|machine_facts"
    "smoke|60|selftest smoke"
    "gemm|60|selftest gemm"
    "cublaslt|45|selftest cublaslt"
    "attention|60|selftest attention"
    "train_step|60|selftest train_step --reference train-step-reference"
    "rope|25|selftest rope"
    "norm|20|selftest norm"
    "swiglu|20|selftest swiglu"
    "embedding|20|selftest embedding"
    "loss|20|selftest loss"
    "elementwise|20|selftest elementwise"
    "optim|30|selftest optim"
    "window|45|selftest window"
    "dsa|60|selftest dsa"
    "moe|45|selftest moe"
    "train_step_all_kinds|60|selftest train_step_all_kinds"
    "train_step_mtp|60|selftest train_step_mtp"
    "train_step_mla|60|selftest train_step_mla"
    "nccl_world1|45|selftest nccl_world1"
    "kernels_api|30|selftest kernels_api"
    "wgmma|45|selftest wgmma"
    "wgmma_no_tma|45|NANOSEEK_WGMMA_NO_TMA=1 selftest wgmma"
    "epilogues|45|selftest epilogues"
    "cuda_tests|90|cuda_tests"
    "memcheck|60|sanitize memcheck attention,dsa,moe,wgmma"
    "racecheck|60|sanitize racecheck attention,dsa,moe,wgmma"
)
SECOND_STAGES=(
    "machine|20|machine_facts"
    "smoke|60|selftest smoke"
    "torch_baselines|100|torch_baselines"
    "bench|110|bench"
    "train_small|90|train_small"
)

machine_facts() {
    echo "commit: $(cat COMMIT 2>/dev/null || echo unknown)"
    # no `| head` under pipefail: head closing the pipe would kill ldd with SIGPIPE
    local glibc
    glibc=$(ldd --version 2>&1 || true)
    echo "glibc: ${glibc%%$'\n'*}"
    echo "kernel: $(uname -r)"
    if ! command -v nvidia-smi >/dev/null; then
        echo "figure: no GPU (nvidia-smi not found)"
        return 77
    fi
    local q
    q=$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1) || {
        echo "$q"
        echo "figure: nvidia-smi failed"
        return 77
    }
    nvidia-smi 2>&1 || true
    echo "figure: ${q%%$'\n'*}; ${glibc%%$'\n'*}"
}

selftest() {
    local group=$1
    shift
    # one report per stage (wgmma and wgmma_no_tma run the same group)
    ./nanoseek selftest --device cuda --only "$group" --output "$out/selftest-${GPU_CHECK_STAGE:-$group}.json" "$@"
}

cuda_tests() {
    [[ -x ./cuda-tests ]] || { echo "figure: no cuda-tests executable in the folder"; return 77; }
    if [[ -n "${NO_DEVICE:-}" ]]; then
        echo "figure: $NO_DEVICE"
        return 77
    fi
    # every test of tests/cuda*.rs once more through the test harness, one thread
    ./cuda-tests --test-threads=1
}

# compute-sanitizer on the small shapes of the given groups: the machine's, else the carried wheel's
sanitize() {
    local tool=$1 groups=$2 cs
    if [[ -n "${NO_DEVICE:-}" ]]; then
        echo "figure: $NO_DEVICE"
        return 77
    fi
    cs=$(command -v compute-sanitizer || true)
    if [[ -z "$cs" ]]; then
        local whl
        whl=$(find sanitizer -name '*.whl' 2>/dev/null || true)
        if [[ -n "$whl" ]] && command -v python3 >/dev/null; then
            mkdir -p "$tmp/sanitizer"
            if python3 -m zipfile -e "${whl%%$'\n'*}" "$tmp/sanitizer"; then
                chmod +x "$tmp"/sanitizer/nvidia/cu13/bin/* 2>/dev/null || true
            fi
            [[ -x "$tmp/sanitizer/nvidia/cu13/bin/compute-sanitizer" ]] && cs=$tmp/sanitizer/nvidia/cu13/bin/compute-sanitizer
        fi
    fi
    [[ -n "$cs" ]] || { echo "figure: no compute-sanitizer on the machine and no wheel carried"; return 77; }
    "$cs" --tool "$tool" --error-exitcode 9 ./nanoseek selftest --device cuda --quick --only "$groups"
}

torch_baselines() {
    if ! command -v python3 >/dev/null || ! python3 -c 'import torch' 2>/dev/null; then
        echo "figure: no python3 with torch"
        return 77
    fi
    if ! python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        echo "figure: torch sees no CUDA device"
        return 77
    fi
    python3 scripts/torch_baselines.py --out "$out/torch_baselines.json" --budget-s 80
}

bench() {
    if [[ -n "${NO_DEVICE:-}" ]]; then
        echo "figure: $NO_DEVICE"
        return 77
    fi
    local base=()
    [[ -s "$out/torch_baselines.json" ]] && base=(--baseline "$out/torch_baselines.json")
    ./nanoseek bench --device cuda "${base[@]}" --budget-s 85 --row-budget-s 15 --output "$out/bench.jsonl"
}

# `small` for 60 s on the GPU: tokens/s, MFU and peak memory by category (metrics.jsonl is
# written per step, so the run's own time limit only ends it early)
train_small() {
    if [[ -n "${NO_DEVICE:-}" ]]; then
        echo "figure: $NO_DEVICE"
        return 77
    fi
    local runs="$out/runs" rc=0
    timeout 70 ./nanoseek train --model-size small --device cuda --num-iterations 400 --eval-every 0 \
        --sample-tokens 0 --quiet --runs-dir "$runs" --run small-cuda || rc=$?
    [[ $rc == 0 || $rc == 124 ]] || return "$rc"
    [[ -s "$runs/small-cuda/metrics.jsonl" ]] || { echo "figure: no metrics.jsonl"; return 1; }
    python3 scripts/compare_runs.py "$runs/small-cuda" "$runs/small-cuda" --out "$out/small-throughput.json" >"$out/small-throughput.log" 2>&1 || true
    rm -rf "$runs"/*/checkpoints # keep the returned folder small
    local last
    last=$(grep -o 'run: .*' "$out/small-throughput.log" || true)
    echo "figure: ${last:-no throughput line}"
}

# ---- the stage runner ----
now() { date +%s.%N; }

# The key figure of a stage from its log: a `figure:` line, else selftest's closing line, else
# the last non-empty line.
figure_of() {
    local log=$1 f
    f=$(grep -a '^figure: ' "$log" | tail -n 1 || true)
    [[ -n "$f" ]] && { echo "${f#figure: }"; return; }
    f=$(grep -a '^selftest: ' "$log" | tail -n 1 || true)
    f=${f#selftest: }
    [[ -n "$f" ]] && { echo "${f#SKIP: }"; return; }
    f=$(grep -a -v '^[[:space:]]*$' "$log" | tail -n 1 || true)
    echo "${f:0:160}"
}

run_stage() {
    local name=$1 limit=$2 cmd=$3 log="$out/logs/$1.log" status rc=0 t0 secs left
    t0=$(now)
    left=$(awk -v b="$budget" -v s="$call_start" -v n="$t0" 'BEGIN { printf "%d", b - (n - s) }')
    if ((left < 5)); then
        printf '%-22s %-7s %6.1fs %s\n' "$name" SKIP 0 "call budget of ${budget}s spent" | tee -a "$out/summary.txt"
        return
    fi
    ((limit > left)) && limit=$left
    if [[ "${GPU_CHECK_TEST_HANG:-}" == "$name" ]]; then
        cmd="sleep 1000"
        limit=${GPU_CHECK_TEST_HANG_TIMEOUT:-3}
    fi
    echo "== $name (timeout ${limit}s): $cmd" >>"$out/run.log"
    # its own process group under its own timeout; -k: a stage that ignores TERM is killed
    GPU_CHECK_STAGE=$name timeout -k 5 "$limit" bash -c "cd '$PWD' && source '$self' --functions && $cmd" >"$log" 2>&1 </dev/null || rc=$?
    secs=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
    0) status=PASS ;;
    77) status=SKIP ;;
    124 | 137) status=TIMEOUT ;;
    *) status=FAIL ;;
    esac
    local fig
    fig=$(figure_of "$log")
    [[ $status == TIMEOUT ]] && fig="killed after ${limit}s${fig:+; $fig}"
    [[ $status == FAIL ]] && fig="exit $rc${fig:+; $fig}"
    printf '%-22s %-7s %6ss %s\n' "$name" "$status" "$secs" "$fig" | tee -a "$out/summary.txt"
    # no device: the stages whose commands cannot tell (training, bench, sanitizer, the test
    # harness) record SKIP with this reason; selftest stages still run and exit 77 themselves
    if [[ $name == smoke && $status == SKIP ]]; then
        NO_DEVICE=$fig
        export NO_DEVICE
    fi
}

run_stages() {
    local spec name limit cmd
    for spec in "$@"; do
        IFS='|' read -r name limit cmd <<<"$spec"
        run_stage "$name" "$limit" "$cmd"
    done
}

build() {
    cd "$(dirname "$0")/.."
    local target=${CARGO_TARGET_DIR:-target} exe size
    cargo build --release
    # the cuda test executable: the last JSON line naming tests/cuda.rs
    exe=$(cargo test --release --test cuda --no-run --message-format=json 2>/dev/null |
        grep '"name":"cuda"' | grep -o '"executable":"[^"]*"' | tail -n 1 | cut -d'"' -f4 || true)
    [[ -x "$exe" ]] || { echo "gpu-check: no cuda test executable found" >&2; exit 1; }
    rm -rf gpu-check
    mkdir -p gpu-check/scripts
    cp "$target/release/nanoseek" gpu-check/nanoseek
    cp "$exe" gpu-check/cuda-tests
    strip gpu-check/nanoseek gpu-check/cuda-tests
    cp scripts/gpu-check.sh scripts/torch_baselines.py scripts/compare_runs.py gpu-check/scripts/
    git rev-parse --short HEAD >gpu-check/COMMIT 2>/dev/null || echo unknown >gpu-check/COMMIT
    # the training-step check's CPU reference, computed here so the device window does not
    gpu-check/nanoseek selftest --write-reference gpu-check/train-step-reference
    # compute-sanitizer for the GPU machine, in case its image has none (about 14 MiB)
    if [[ "${GPU_CHECK_NO_SANITIZER:-}" != 1 ]]; then
        mkdir -p gpu-check/sanitizer
        python3 -m pip download --quiet --no-deps --disable-pip-version-check -d gpu-check/sanitizer \
            "$SANITIZER_WHEEL" 2>/dev/null || echo "gpu-check: could not download $SANITIZER_WHEEL; the sanitizer stages use the machine's"
    fi
    size=$(du -sm gpu-check | cut -f1)
    if ((size >= MAX_MIB)) && [[ -d gpu-check/sanitizer ]]; then
        echo "gpu-check: ${size} MiB with the sanitizer wheel; leaving it out"
        rm -rf gpu-check/sanitizer
        size=$(du -sm gpu-check | cut -f1)
    fi
    echo "gpu-check: gpu-check/ holds ${size} MiB; on the GPU machine: cd gpu-check && scripts/gpu-check.sh run first"
    ((size < MAX_MIB)) || { echo "gpu-check: folder is over $MAX_MIB MiB" >&2; exit 1; }
}

run() {
    cd "$(dirname "$self")/.."
    out=${OUT:-$PWD/out}
    mkdir -p "$out/logs"
    out=$(cd "$out" && pwd)
    tmp=$(mktemp -d)
    export out tmp
    # kernels are loaded from embedded SASS on Hopper; for anything JIT-compiled, a writable cache
    export CUDA_CACHE_PATH=${CUDA_CACHE_PATH:-$tmp/nv-cache} CUDA_CACHE_MAXSIZE=4294967296
    # cuBLASLt (the baseline GEMM) is loaded by name; without a system copy, use PyTorch's
    # (the list is read whole first: `grep -q` closing a pipe early would fail it under pipefail)
    local libs
    libs=$(ldconfig -p 2>/dev/null || true)
    if [[ $libs != *libcublasLt.so* ]] && command -v python3 >/dev/null; then
        local lt="" d
        for d in $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true); do
            [[ -d "$d" ]] || continue
            lt=$(find "$d" -name 'libcublasLt.so*' 2>/dev/null | sort | tail -n 1 || true)
            [[ -n "$lt" ]] && break
        done
        if [[ -n "$lt" ]]; then
            LD_LIBRARY_PATH="$(dirname "$lt"):${LD_LIBRARY_PATH:-}"
            export LD_LIBRARY_PATH
            echo "cuBLASLt: $lt" >>"$out/run.log"
        fi
    fi
    budget=${GPU_CHECK_BUDGET_S:-230}
    call_start=$(now)
    local stages=()
    case "${1:-}" in
    first) stages=("${FIRST_STAGES[@]}") ;;
    second) stages=("${SECOND_STAGES[@]}") ;;
    all) stages=("${FIRST_STAGES[@]}" "${SECOND_STAGES[@]:2}") ;;
    "")
        echo "usage: scripts/gpu-check.sh run first|second|all|STAGE..." >&2
        exit 2
        ;;
    *)
        local want spec
        for want in "$@"; do
            spec=$(printf '%s\n' "${FIRST_STAGES[@]}" "${SECOND_STAGES[@]}" | grep -m 1 "^$want|" || true)
            [[ -n "$spec" ]] || { echo "gpu-check: no stage named $want (scripts/gpu-check.sh stages)" >&2; exit 2; }
            stages+=("$spec")
        done
        ;;
    esac
    echo "# gpu-check run $* at $(date -u +%FT%TZ), commit $(cat COMMIT 2>/dev/null || echo unknown), budget ${budget}s" |
        tee -a "$out/summary.txt"
    run_stages "${stages[@]}"
    rm -rf "$tmp"
    local total
    total=$(awk -v a="$call_start" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }')
    echo "# done in ${total}s: $(grep -c ' PASS ' "$out/summary.txt" || true) PASS, $(grep -c ' FAIL ' "$out/summary.txt" || true) FAIL, $(grep -c ' TIMEOUT ' "$out/summary.txt" || true) TIMEOUT, $(grep -c ' SKIP ' "$out/summary.txt" || true) SKIP (whole file)" |
        tee -a "$out/summary.txt"
}

self=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
# a stage's process sources this file with --functions for the functions above, and stops here
if [[ "${1:-}" == --functions ]]; then
    # shellcheck disable=SC2317
    return 0 2>/dev/null || exit 0
fi
case "${1:-}" in
build) build ;;
run)
    shift
    run "$@"
    ;;
stages)
    echo "first call:"
    printf '  %s\n' "${FIRST_STAGES[@]}"
    echo "second call:"
    printf '  %s\n' "${SECOND_STAGES[@]}"
    ;;
*)
    echo "usage: scripts/gpu-check.sh build|run first|second|all|STAGE...|stages" >&2
    exit 2
    ;;
esac
