#!/usr/bin/env bash
# The GPU check in two halves (../shared/docs/ENGINEERING.md, section 2):
#
#   scripts/gpu-check.sh build   on a machine without a GPU: release build, gather the
#                                stripped nanoseek binary, the CUDA test executable and
#                                scripts/ into gpu-check/ (kept well under 40 MiB)
#   scripts/gpu-check.sh run     on the GPU machine, from inside gpu-check/ (no Rust, no
#                                network): prints `ldd --version` and `nvidia-smi`, runs the
#                                CUDA parity tests, the PyTorch baselines and `nanoseek bench`
#                                (the same kernels, ratio to PyTorch), writes logs and JSON
#                                under $OUT (default ./out)
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
    cp scripts/gpu-check.sh scripts/torch_baselines.py gpu-check/scripts/
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
    # parity tests, one thread so each kernel's output is readable
    timeout 300 ./cuda-tests --test-threads=1 --nocapture 2>&1 | tee "$out/cuda-tests.log" || echo "cuda tests failed" | tee -a "$out/cuda-tests.log"
    baseline=()
    if command -v python3 >/dev/null && python3 -c 'import torch' 2>/dev/null; then
        timeout 240 python3 scripts/torch_baselines.py --out "$out/torch_baselines.json" 2>&1 | tee "$out/torch_baselines.log" || true
        [[ -s "$out/torch_baselines.json" ]] && baseline=(--baseline "$out/torch_baselines.json")
    else
        echo "gpu-check: no python3 with torch; baselines skipped" | tee "$out/torch_baselines.log"
    fi
    # the engine's kernels at the same shapes, with the ratio to the baselines just measured
    timeout 180 ./nanoseek bench --device cuda "${baseline[@]}" --output "$out/bench.json" 2>&1 | tee "$out/bench.log" || echo "bench failed" | tee -a "$out/bench.log"
    echo "gpu-check: results in $out"
    ;;
*)
    echo "usage: scripts/gpu-check.sh build|run" >&2
    exit 2
    ;;
esac
