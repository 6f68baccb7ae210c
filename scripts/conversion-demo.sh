#!/usr/bin/env bash
# The dense-to-sparse conversion demo of the README ("Sparse attention, MoE and decoding"):
# DeepSeek-V3.2's recipe on the long-range `needle` task. A dense 2-layer parent (`DD`, d 128,
# 4 heads) learns the task; from its checkpoint, with the same further budget (steps, batch,
# data, seed), (a) the parent continues densely (`DD`) and (b) a converted model (`DS`: layer 1
# becomes DSA, the lightning indexer's top 8 keys plus the 8 most recent) first trains only its
# fresh indexer against the dense attention (main model frozen), then trains everything sparsely.
# In `DS` layer 0 stays dense and could carry the needle to the answer by itself; (c) converts
# both layers (`SS`), so every long-range path goes through an indexer's selection; (d) the
# `DS` conversion without the warm-up (sparse from the first step) shows what the warm-up buys.
# All five, and (b) and (c) at the end of their frozen warm-up, are scored by
# `nanoseek eval` (val loss, needle accuracy by depth); a summary with the indexer KL goes to
# docs/conversion-demo/summary.json.
#
#   scripts/conversion-demo.sh [OUT_DIR]      (default demo-runs/; 20 min on 2 busy cores)
#   NS=path/to/nanoseek scripts/conversion-demo.sh   (use that binary; otherwise cargo builds)
#
# Parent: 400 steps of 128 × 16 tokens, then (`--init-from`) 1000 steps of 32 × 64 tokens (the
# long-range demo's curriculum; trained directly on 64-token samples nothing learned the task).
# Continuation: 1000 steps of 32 × 64 tokens for each; the first 200 of (b) and (c) are the
# frozen indexer warm-up. With 64-token samples the needle is mostly beyond the 8 local keys.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-demo-runs}
docs=docs/conversion-demo
mkdir -p "$out" "$docs"
if [[ -z "${NS:-}" ]]; then
    cargo build --release --quiet
fi
ns=${NS:-target/release/nanoseek}
warmup=200
"$ns" data --synthetic --task needle --max-seq-len 16 --num-samples 100000 -o "$out/needle16" --quiet --force
"$ns" data --synthetic --task needle --max-seq-len 64 --num-samples 40000 -o "$out/needle64" --quiet --force
common=(--n-layer 2 --n-embd 128 --n-head 4 --sample-tokens 0 --quiet --runs-dir "$out")
dsa=(--index-topk 8 --index-local-window 8 --index-n-heads 4 --index-head-dim 32)
p1=(--data "$out/needle16" --max-seq-len 16 --device-batch-size 128 --num-iterations 400 --eval-every 0)
p2=(--data "$out/needle64" --max-seq-len 64 --device-batch-size 32 --num-iterations 1000 --eval-every 250)
nice "$ns" train "${common[@]}" "${p1[@]}" --attn-pattern DD --run parent-p1
nice "$ns" train "${common[@]}" "${p2[@]}" --attn-pattern DD --init-from "$out/parent-p1" --run parent
# the same budget from the parent: dense continued, and converted (frozen warm-up, then sparse)
nice "$ns" train "${common[@]}" "${p2[@]}" --attn-pattern DD --dsa-warmup-steps 0 --init-from "$out/parent" \
    --run dense &
nice "$ns" train "${common[@]}" "${p2[@]}" --attn-pattern DS "${dsa[@]}" --dsa-warmup-steps "$warmup" \
    --freeze-main-during-warmup true --init-from "$out/parent" --save-every "$warmup" --keep-checkpoints 0 \
    --run converted &
# both layers converted (`SS`): no dense layer is left to carry the needle past the indexers
nice "$ns" train "${common[@]}" "${p2[@]}" --attn-pattern SS "${dsa[@]}" --dsa-warmup-steps "$warmup" \
    --freeze-main-during-warmup true --init-from "$out/parent" --save-every "$warmup" --keep-checkpoints 0 \
    --run converted-ss &
# the same conversion without the warm-up: sparse from the first step with a fresh indexer
nice "$ns" train "${common[@]}" "${p2[@]}" --attn-pattern DS "${dsa[@]}" --dsa-warmup-steps 0 \
    --init-from "$out/parent" --run converted-nowarmup &
wait
for r in parent dense converted converted-warmup converted-ss converted-ss-warmup converted-nowarmup; do
    path="$out/$r"
    # the checkpoint at the end of the frozen warm-up: the parent's weights, sparse, new indexers
    if [[ $r == *-warmup ]]; then
        path=$(printf '%s/%s/checkpoints/step_%06d' "$out" "${r%-warmup}" "$warmup")
    fi
    "$ns" eval --model-path "$path" --data "$out/needle64" --eval-tokens 65536 --tasks needle \
        --task-samples 512 --depth-buckets 8 --output "$docs/$r-eval.json" >/dev/null
done
python3 - "$out" "$docs" "$warmup" <<'EOF'
import json, sys
out, docs, warmup = sys.argv[1], sys.argv[2], int(sys.argv[3])

def metrics(run):
    return [json.loads(l) for l in open(f"{out}/{run}/metrics.jsonl")]

def kl(run, warmup):
    ks = [r["indexer_loss"] for r in metrics(run) if "indexer_loss" in r]
    return {"first": ks[0], "end_of_warmup": ks[warmup - 1] if warmup else None, "last": ks[-1],
            "mean_last_50": sum(ks[-50:]) / len(ks[-50:])}

steps = {"parent": "400 × 128 × 16 + 1000 × 32 × 64", "dense": "parent + 1000 × 32 × 64",
         "converted": f"parent + 1000 × 32 × 64 ({warmup} frozen warm-up)",
         "converted-warmup": f"parent + {warmup} × 32 × 64 (indexer only)",
         "converted-ss": f"parent + 1000 × 32 × 64 ({warmup} frozen warm-up)",
         "converted-ss-warmup": f"parent + {warmup} × 32 × 64 (indexers only)",
         "converted-nowarmup": "parent + 1000 × 32 × 64 (no warm-up)"}
summary = {}
for r in steps:
    e = json.load(open(f"{docs}/{r}-eval.json"))
    t = e["tasks"]["needle"]
    summary[r] = {"steps": steps[r], "val_loss": e["loss"], "needle_accuracy": t["accuracy"],
                  "needle_by_depth": t["by_depth"], "eval": f"{r}-eval.json"}
summary["converted"]["indexer_kl"] = kl("converted", warmup)
summary["converted-ss"]["indexer_kl"] = kl("converted-ss", warmup)
summary["converted-nowarmup"]["indexer_kl"] = kl("converted-nowarmup", 0)
json.dump(summary, open(f"{docs}/summary.json", "w"), indent=2, ensure_ascii=False)
for r, s in summary.items():
    by = "  ".join(f"{100 * v:.0f}%" for v in s["needle_by_depth"].values())
    print(f"{r:19} val loss {s['val_loss']:.4f}  needle {100 * s['needle_accuracy']:5.1f}%  by depth  {by}")
for r in ("converted", "converted-ss", "converted-nowarmup"):
    k = summary[r]["indexer_kl"]
    w = f", {k['end_of_warmup']:.4f} at the end of the warm-up" if k["end_of_warmup"] is not None else ""
    print(f"{r}: indexer KL {k['first']:.4f} at step 1{w}, {k['last']:.4f} at the end "
          f"(mean of the last 50 steps {k['mean_last_50']:.4f})")
EOF
