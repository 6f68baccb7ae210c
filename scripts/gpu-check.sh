#!/usr/bin/env bash
# The GPU check in two halves (../shared/docs/ENGINEERING.md, section 2):
#
#   scripts/gpu-check.sh build   on a machine without a GPU: release build, gather the
#                                stripped nanoseek binary, the CUDA test executable and
#                                scripts/ into gpu-check/ (kept well under 40 MiB)
#   scripts/gpu-check.sh run [tests|bench|train]
#                                on the GPU machine, from inside gpu-check/ (no Rust, no
#                                network): prints `ldd --version` and `nvidia-smi`, runs the
#                                CUDA parity tests, the PyTorch baselines and `nanoseek bench`
#                                (the same kernels, ratio to PyTorch), writes logs and JSON
#                                under $OUT (default ./out), then `small`'s first training
#                                steps on CUDA vs the CPU and a 1-minute `small` run (tokens/s, MFU)
set -euo pipefail
case "${1:-}" in
build)
    cd "$(dirname "$0")/.."
    target=${CARGO_TARGET_DIR:-target}
    cargo build --release
    # the cuda test executable: the last JSON line naming tests/cuda.rs
    exe=$(cargo test --release --test cuda --no-run --message-format=json 2>/dev/null \
        | grep '"name":"cuda"' | grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4)
    [[ -x "$exe" ]] || { echo "gpu-check: no cuda test executable found" >&2; exit 1; }
    rm -rf gpu-check
    mkdir -p gpu-check/scripts
    cp "$target/release/nanoseek" gpu-check/nanoseek
    cp "$exe" gpu-check/cuda-tests
    strip gpu-check/nanoseek gpu-check/cuda-tests
    cp scripts/gpu-check.sh scripts/torch_baselines.py scripts/compare_runs.py gpu-check/scripts/
    git rev-parse --short HEAD >gpu-check/COMMIT 2>/dev/null || echo unknown >gpu-check/COMMIT
    size=$(du -sm gpu-check | cut -f1)
    echo "gpu-check: gpu-check/ holds ${size} MiB; on the GPU machine: cd gpu-check && scripts/gpu-check.sh run"
    ((size < 40)) || { echo "gpu-check: folder is over 40 MiB" >&2; exit 1; }
    ;;
run)
    cd "$(dirname "$0")/.."
    out=${OUT:-$PWD/out}
    mkdir -p "$out"
    {
        echo "commit: $(cat COMMIT 2>/dev/null || echo unknown)"
        ldd --version | head -1
        nvidia-smi || true
    } 2>&1 | tee "$out/machine.txt"
    phase=${2:-all} # all, or one of: tests, bench, train (each fits one device call on its own)
    # cuBLASLt (`--gemm cublaslt`, the bench's baseline GEMM) is loaded by name at run time; when
    # the system has none, use the one PyTorch's wheels bring
    if ! ldconfig -p 2>/dev/null | grep -q 'libcublasLt\.so' && command -v python3 >/dev/null; then
        lt=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null |
            xargs -r -n1 -I{} find {} -name 'libcublasLt.so*' 2>/dev/null | head -1)
        [[ -n "$lt" ]] && export LD_LIBRARY_PATH="$(dirname "$lt"):${LD_LIBRARY_PATH:-}" && echo "cuBLASLt: $lt"
    fi
    # parity tests, one thread so each kernel's output is readable
    if [[ $phase == all || $phase == tests ]]; then
        timeout 180 ./cuda-tests --test-threads=1 --nocapture 2>&1 | tee "$out/cuda-tests.log" || echo "cuda tests failed" | tee -a "$out/cuda-tests.log"
    fi
    baseline=()
    if [[ $phase == all || $phase == bench ]]; then
    if command -v python3 >/dev/null && python3 -c 'import torch' 2>/dev/null; then
        timeout 200 python3 scripts/torch_baselines.py --out "$out/torch_baselines.json" 2>&1 | tee "$out/torch_baselines.log" || true
        [[ -s "$out/torch_baselines.json" ]] && baseline=(--baseline "$out/torch_baselines.json")
    else
        echo "gpu-check: no python3 with torch; baselines skipped" | tee "$out/torch_baselines.log"
    fi
    # the engine's kernels at the same shapes, with the ratio to the baselines just measured
    timeout 100 ./nanoseek bench --device cuda "${baseline[@]}" --output "$out/bench.json" 2>&1 | tee "$out/bench.log" || echo "bench failed" | tee -a "$out/bench.log"
    fi
    if [[ $phase == all || $phase == train ]]; then
    # training: `small`'s first steps on the GPU against the CPU on the same data and init, then a
    # 1-minute `small` run for tokens/s and MFU (metrics.jsonl is written per step, so the
    # timeout only ends the run early)
    runs="$out/runs"
    first=(--model-size small --max-seq-len 512 --device-batch-size 2 --total-batch-size 1024
        --num-iterations 3 --eval-every 0 --sample-tokens 0 --quiet --runs-dir "$runs")
    timeout 100 ./nanoseek train "${first[@]}" --device cpu --run small-cpu 2>&1 | tee "$out/train-small-cpu.log" || true
    timeout 45 ./nanoseek train "${first[@]}" --device cuda --run small-cuda-first 2>&1 | tee "$out/train-small-cuda-first.log" || true
    timeout 75 ./nanoseek train --model-size small --device cuda --num-iterations 400 --eval-every 0 \
        --sample-tokens 0 --quiet --runs-dir "$runs" --run small-cuda 2>&1 | tee "$out/train-small-cuda.log" || true
    if command -v python3 >/dev/null; then
        python3 scripts/compare_runs.py "$runs/small-cpu" "$runs/small-cuda-first" --out "$out/small-first-steps.json" \
            2>&1 | tee "$out/small-first-steps.log" || true
        python3 scripts/compare_runs.py "$runs/small-cuda" "$runs/small-cuda" --out "$out/small-throughput.json" \
            2>&1 | tail -1 | tee "$out/small-throughput.log" || true
    fi
    rm -rf "$runs"/*/checkpoints # keep the returned folder small
    fi
    echo "gpu-check: results in $out"
    ;;
*)
    echo "usage: scripts/gpu-check.sh build|run" >&2
    exit 2
    ;;
esac
