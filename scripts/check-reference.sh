#!/usr/bin/env bash
# Check the engine against its written specification (docs/model.md): train small models,
# then compare `nanoseek eval`'s loss on a synthetic shard with the independent NumPy float64
# reference in scripts/reference_loss.py (written from the doc alone). The models:
#   gqa:  a window + global layer with a dense FFN, then a DSA layer (top-8 + local 4 of 64
#         keys) with a MoE FFN whose routing bias has moved;
#   mla:  Multi-head Latent Attention with a query latent and d_v != d_n, layers D, W, S (MLA's
#         default indexer, v32), the S layer with a MoE FFN;
#   mla-q0: MLA without a query latent (q_lora_rank 0), layers S and D;
#   mla-v32: MLA with DeepSeek-V3.2's indexer (query from the query latent, LayerNorm'd key,
#         RoPE on 4 of 16 index dims), layers D and S.
#
# Run from the repo root, after `cargo test --release` (or `cargo build --release`).
set -euo pipefail

cd "$(dirname "$0")/.."

# NANOSEEK_BIN: another build of the engine to check (default: this tree's release build)
bin=${NANOSEEK_BIN:-target/release/nanoseek}
venv=target/pyref

if [[ ! -x "$bin" ]]; then
    echo "check-reference: $bin missing; building it"
    cargo build --release
fi

if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check numpy safetensors
py="$venv/bin/python"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

eval_tokens=4096
batch=4

# 2 × 4096 + 1 tokens: more than the 4096 targets scored. The header says vocab 4096
# (the model's); the ids stay below 2000.
"$py" scripts/reference_loss.py --write-shard "$tmp/shard.bin" \
    --vocab 4096 --max-id 2000 --n 8193 --seed 1

# `eval --data FILE` scores the last 5% a single training shard holds out; the reference
# scores the shard from its start, so the engine reads it as the val split of a data folder.
mkdir "$tmp/refdata"
cp "$tmp/shard.bin" "$tmp/refdata/train.bin"
cp "$tmp/shard.bin" "$tmp/refdata/val.bin"

# check NAME TRAIN_ARGS...: train 30 steps with the common flags and these, then compare
# the engine's eval loss with the reference's.
check() {
    local name=$1
    shift
    "$bin" train --n-embd 64 --n-head 4 --max-seq-len 64 \
        --dsa-window-size 16 --n-global 2 \
        --index-topk 8 --index-local-window 4 --index-n-heads 2 --index-head-dim 16 \
        --device-batch-size 4 --num-iterations 30 --sample-tokens 0 --quiet --device cpu \
        --runs-dir "$tmp" --run "$name" "$@" >/dev/null
    local ckpt="$tmp/$name/checkpoints/step_000030"
    "$bin" eval --model-path "$ckpt" --data "$tmp/refdata" \
        --eval-tokens "$eval_tokens" --batch-size "$batch" --output "$tmp/$name.eval.json" >/dev/null
    "$py" scripts/reference_loss.py "$ckpt" "$tmp/shard.bin" \
        --eval-tokens "$eval_tokens" --batch-size "$batch" >"$tmp/$name.ref.json"
    compare "$name" "$tmp/$name.eval.json" "$tmp/$name.ref.json"
}

# Tolerance: the engine computes in f32 (~6e-8 relative rounding per op, with fixed-order
# reductions over at most a few thousand terms) and uses a vectorized polynomial exp/tanh
# (relative error < 3e-7, tanh absolute error < 3e-7); the reference is f64 with libm.
# For a mean loss of O(1..10) nats this puts the expected difference around 1e-6
# relative (observed: ~2.5e-7 absolute on a loss of ~10, i.e. 2.5e-8 relative).
# 1e-5·max(1, |ref|) leaves a 40× margin for that noise while catching real formula
# differences: a wrong RoPE frequency, GQA head mapping or a missing softcap each move
# this loss by 2e-2 or more, and treating the window layer as dense moves it by 1.3e-3.
# (Still too coarse for the rmsnorm eps alone: 1e-5 instead of 1e-6 moves it by ~7e-6.)
# On the MLA model, leaving out k_pe's RoPE, the c_kv norm or the query-latent norm moves the
# loss by 1.2e-2, 9e-3 and 3e-3; on the mla-v32 model, rotating all 16 index dims instead of 4
# moves it by 3e-3 and leaving out k_norm's bias by 1e-3 (the indexer acts only through the
# keys it selects).
compare() {
    "$py" - "$@" <<'EOF'
import json, sys
name = sys.argv[1]
eng = json.load(open(sys.argv[2]))
ref = json.load(open(sys.argv[3]))
le, lr = float(eng["loss"]), float(ref["loss"])
te, tr = int(eng["tokens"]), int(ref["tokens"])
diff = abs(le - lr)
tol = 1e-5 * max(1.0, abs(lr))
ok = diff <= tol and te == tr
print(f"reference check ({name}): engine loss {le:.8f}, numpy loss {lr:.8f}, |diff| {diff:.3e} "
      f"over {tr} tokens: {'OK' if ok else 'FAILED'}")
if not ok:
    if te != tr:
        print(f"reference check: token counts differ: engine {te}, reference {tr}", file=sys.stderr)
    if diff > tol:
        print(f"reference check: |diff| {diff:.3e} > tolerance {tol:.3e}", file=sys.stderr)
    sys.exit(1)
EOF
}

check gqa --n-layer 2 --n-kv-head 2 --attn-pattern WS \
    --n-routed-experts 4 --moe-top-k 2 --moe-inter-dim 48 --bias-update-speed 0.01
check mla --n-layer 3 --attention mla --attn-pattern DWS --q-lora-rank 32 --kv-lora-rank 24 \
    --qk-nope-head-dim 16 --qk-rope-head-dim 8 --v-head-dim 12 \
    --n-routed-experts 4 --moe-top-k 2 --moe-inter-dim 48 --first-k-dense 2
# v32 is MLA's default indexer: mla checks v32 (index_rope_dim derived,
# query from the query latent) and mla-q0 keeps the GQA indexer on MLA by name.
check mla-q0 --n-layer 2 --attention mla --attn-pattern SD --q-lora-rank 0 --kv-lora-rank 32 \
    --qk-nope-head-dim 16 --qk-rope-head-dim 8 --v-head-dim 16 --indexer gqa
check mla-v32 --n-layer 2 --attention mla --attn-pattern DS --q-lora-rank 32 --kv-lora-rank 24 \
    --qk-nope-head-dim 16 --qk-rope-head-dim 8 --v-head-dim 16 --indexer v32 --index-rope-dim 4
