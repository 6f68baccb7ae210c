#!/usr/bin/env bash
# The multi-token prediction demo of the README: the default `tiny` run (250 steps of the
# embedded synthetic language) without and with one MTP module (λ 0.3), the model's own
# validation loss side by side, then the MTP module as the draft model of speculative decoding
# (`demo --mode test --speculative mtp`: acceptance, tokens per main forward, tokens/s with and
# without speculation on the same prompts, greedy outputs compared token for token).
#
#   scripts/mtp-demo.sh [OUT_DIR]      (default demo-runs/; about 10 min on 2 idle cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-demo-runs}
mkdir -p "$out"
cargo build --release --quiet
ns=target/release/nanoseek
$ns train --runs-dir "$out" --run tiny-plain --quiet --sample-tokens 0
$ns train --runs-dir "$out" --run tiny-mtp1 --mtp-depth 1 --quiet --sample-tokens 0
for r in tiny-plain tiny-mtp1; do
    python3 - "$out/$r/metrics.jsonl" "$r" <<'PY'
import json, sys
vals = [json.loads(l) for l in open(sys.argv[1]) if '"val_loss"' in l]
print(f"{sys.argv[2]}: validation loss {vals[-1]['val_loss']:.3f} ({vals[-1]['val_bpb']:.3f} bits per byte) after step {vals[-1]['step']}")
PY
done
for temp in 0 0.8; do
    $ns demo --model-path "$out/tiny-mtp1" --mode test --speculative mtp --temperature "$temp" \
        --output "$out/speculative-t$temp.json" | grep '^speculative'
done
