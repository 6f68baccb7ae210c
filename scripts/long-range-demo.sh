#!/usr/bin/env bash
# The long-range learning demo of the README ("Sparse attention, MoE and decoding"): two
# 2-layer models, window-only (`WW`, W = 8) and window + DSA (`WS`: top-8 by the lightning
# indexer plus the 8 most recent keys), trained on the `needle` task and evaluated by depth.
#
#   scripts/long-range-demo.sh [OUT_DIR]      (default demo-runs/; about 40 min on 2 cores)
#
# Curriculum: phase 1 trains on 16-token samples (400 steps of 128 samples), where both models
# can learn the retrieval; phase 2 starts from those weights (`--init-from`) on 64-token samples
# (1500 steps of 32), where the needle is mostly beyond the window's reach (two window-8 layers
# see 16 tokens back). The DSA model attends densely for its first 500 phase-2 steps (the
# indexer's warm-up), sparsely after. Trained directly on 64-token samples, neither model
# learned the task in 3000 steps (see the README).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-demo-runs}
mkdir -p "$out"
cargo build --release --quiet
ns=target/release/nanoseek
$ns data --synthetic --task needle --max-seq-len 16 --num-samples 100000 -o "$out/needle16" --quiet --force
$ns data --synthetic --task needle --max-seq-len 64 --num-samples 40000 -o "$out/needle64" --quiet --force
common=(--n-layer 2 --n-embd 128 --n-head 4 --dsa-window-size 8 --n-global 0 --sample-tokens 0 --quiet --runs-dir "$out")
dsa=(--index-topk 8 --index-local-window 8 --index-n-heads 4 --index-head-dim 32)
p1=(--data "$out/needle16" --max-seq-len 16 --device-batch-size 128 --num-iterations 400 --eval-every 0)
p2=(--data "$out/needle64" --max-seq-len 64 --device-batch-size 32 --num-iterations 1500 --eval-every 500)
$ns train "${common[@]}" "${p1[@]}" --attn-pattern WW --run ww-p1 &
$ns train "${common[@]}" "${p1[@]}" --attn-pattern WS "${dsa[@]}" --dsa-warmup-steps 400 --run ws-p1 &
wait
$ns train "${common[@]}" "${p2[@]}" --attn-pattern WW --init-from "$out/ww-p1" --run ww &
$ns train "${common[@]}" "${p2[@]}" --attn-pattern WS "${dsa[@]}" --dsa-warmup-steps 500 --init-from "$out/ws-p1" --run ws &
wait
for r in ww ws; do
    $ns eval --model-path "$out/$r" --data "$out/needle64" --eval-tokens 8192 --tasks needle \
        --task-samples 512 --depth-buckets 8 --output "$out/$r-eval.json" >/dev/null
    python3 - "$out/$r-eval.json" "$r" <<'EOF'
import json, sys
t = json.load(open(sys.argv[1]))["tasks"]["needle"]
by = "  ".join(f"{k}: {100 * v:.0f}%" for k, v in t["by_depth"].items())
print(f"{sys.argv[2]}: needle accuracy {100 * t['accuracy']:.1f}% ({t['correct']}/{t['samples']})  by depth  {by}")
EOF
done
