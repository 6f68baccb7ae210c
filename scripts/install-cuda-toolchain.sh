#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, NVVM, CRT headers, CCCL, runtime
# headers) from PyPI into .cuda/ at the repository root. Needs no GPU and no root.
# 13.0 matches the GPU machine's driver (580, CUDA 13.0): the PTX it emits (ISA 9.0)
# loads there, PTX from a newer nvcc would not. Idempotent: does nothing when the
# pinned version is already installed. Prints the nvcc path and version.
#
#   scripts/install-cuda-toolchain.sh [--force]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEST=$ROOT/.cuda
NVCC=$DEST/nvidia/cu13/bin/nvcc
WANT_RELEASE="release 13.0, V13.0.88"
PKGS=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.88
      nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85)
STAMP=$DEST/.installed

want_stamp=$(printf '%s\n' "${PKGS[@]}")
if [[ "${1:-}" != "--force" && -x "$NVCC" && -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]] \
    && "$NVCC" --version 2>/dev/null | grep -q "$WANT_RELEASE"; then
    echo "cuda toolchain: already installed"
else
    echo "cuda toolchain: installing ${PKGS[*]} into .cuda/"
    rm -rf "$DEST"
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
        --target "$DEST" "${PKGS[@]}"
    # wheels do not always keep the executable bit on the driver's helper programs
    chmod +x "$DEST"/nvidia/cu13/bin/* 2>/dev/null || true
    find "$DEST"/nvidia/cu13 -path '*nvvm/bin/*' -type f -exec chmod +x {} + 2>/dev/null || true
    "$NVCC" --version | grep -q "$WANT_RELEASE" || {
        echo "cuda toolchain: $NVCC is not $WANT_RELEASE" >&2
        "$NVCC" --version >&2 || true
        exit 1
    }
    printf '%s\n' "${PKGS[@]}" > "$STAMP"
fi
echo "nvcc: $NVCC"
"$NVCC" --version | tail -n 2
