#!/usr/bin/env bash
# Regenerates src/backend/cuda/abi.rs (the Rust side of the kernel parameter
# structs) from cuda/abi.h with bindgen, through the small tools/abi-bindgen crate.
# bindgen needs libclang (apt-get install libclang-dev); a fresh machine lacks it,
# which is why the generated file is committed.
#
#   scripts/gen-bindings.sh           rewrite src/backend/cuda/abi.rs
#   scripts/gen-bindings.sh --check   fail (exit 1) when it differs from a fresh run
#
# Exit 2 when libclang is missing (so callers can tell "cannot check" from "stale").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=src/backend/cuda/abi.rs
if [[ -z "${LIBCLANG_PATH:-}" ]] && ! ldconfig -p 2>/dev/null | grep -q 'libclang\(-[0-9.]*\)\?\.so'; then
    lib=$(find /usr/lib -path '/usr/lib/llvm-*/lib/libclang.so*' 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n "$lib" ]]; then
        LIBCLANG_PATH=$(dirname "$lib")
        export LIBCLANG_PATH
    else
        echo "gen-bindings: no libclang (apt-get install libclang-dev, or set LIBCLANG_PATH)" >&2
        exit 2
    fi
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# a target dir outside the clone, so CI runs on the same machine reuse the build of bindgen
CARGO_TARGET_DIR=${ABI_BINDGEN_TARGET:-${XDG_CACHE_HOME:-$HOME/.cache}/nanoseek-abi-bindgen} \
    cargo run --quiet --release --manifest-path tools/abi-bindgen/Cargo.toml -- cuda/abi.h "$tmp/abi.rs"
rustfmt --edition 2021 --config-path rustfmt.toml "$tmp/abi.rs"
if [[ "${1:-}" == "--check" ]]; then
    if cmp -s "$tmp/abi.rs" "$OUT"; then
        echo "gen-bindings: $OUT is current"
    else
        echo "gen-bindings: $OUT is STALE against cuda/abi.h; run scripts/gen-bindings.sh:" >&2
        diff -u "$OUT" "$tmp/abi.rs" >&2 || true
        exit 1
    fi
else
    cp "$tmp/abi.rs" "$OUT"
    echo "gen-bindings: wrote $OUT"
fi
