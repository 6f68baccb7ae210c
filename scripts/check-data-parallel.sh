#!/usr/bin/env bash
# Data-parallel training over MPI on the CPU (ZeRO-1), for every layer kind (D, W, S, MoE, and MLA projections):
#   1. mpirun -np 2, one micro-batch per rank == one process with 2 micro-batches: bitwise
#      (every logged figure of every step, the final weights and optimizer state files)
#   2. mpirun -np 4 == one process with 4 micro-batches: bitwise as well (gradients are summed
#      on their owner in rank order, ((g0 + g1) + g2) + g3, the order one process accumulates in)
#   3. a run saved at -np 2 resumes at -np 1 and ends bitwise where the uninterrupted -np 2 run
#      ends; resumed at -np 4 (1 sequence per rank: sums reordered) it ends within a tolerance
# then MTP (depth 1) at -np 2 within a tolerance (its shared embedding and head take two gradient
# contributions per micro-batch); then, once: per-rank optimizer memory at 1, 2, 4 ranks == `nanoseek info --world-size N`;
# a rank killed with SIGKILL ends the job non-zero with no partial checkpoint; a stalled rank
# (SIGSTOP) ends the job through the collective timeout.
# Needs Open MPI (mpirun) and builds `--features mpi`. Usage: scripts/check-data-parallel.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v mpirun >/dev/null || { echo "check-data-parallel: mpirun not found (apt-get install openmpi-bin libopenmpi-dev)" >&2; exit 1; }
cargo build --release --features mpi -q
BIN=$PWD/target/release/nanoseek
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
# (rayon threads per rank: the machine's cores shared out, so 4 ranks on 2 cores stay quick)
export RAYON_NUM_THREADS=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# micro-batch 2 × 64 tokens; a step's total batch is that times the micro-batches of all ranks
MODEL=(--n-layer 2 --n-embd 64 --n-head 2 --max-seq-len 64)
COMMON=(--device cpu "${MODEL[@]}" --device-batch-size 2 --eval-batches 1 --eval-every 2 --sample-tokens 0 --quiet
    --skip-selftest --runs-dir "$work")
RESUME=(--runs-dir "$work" --quiet --sample-tokens 0 --device cpu --skip-selftest)
declare -A KIND=(
    [D]="--attn-pattern D"
    [W]="--attn-pattern W --dsa-window-size 16 --n-global 2"
    [S]="--attn-pattern SD --index-topk 16 --index-local-window 4 --dsa-warmup-steps 1"
    [MoE]="--attn-pattern D --n-routed-experts 4 --moe-top-k 2 --n-shared-experts 1 --first-k-dense 0 --seq-aux-alpha 0.001"
    [MLA]="--attn-pattern WD --dsa-window-size 16 --n-global 2 --attention mla --q-lora-rank 32"
)

train() { # ranks (0: no mpirun) run-name steps micro-batches-per-step-over-all-ranks [flags...]
    local np=$1 run=$2 steps=$3 micro=$4
    shift 4
    local args=(train "${COMMON[@]}" --run "$run" --num-iterations "$steps" --total-batch-size $((micro * 128)) "$@")
    if [[ $np == 0 ]]; then "$BIN" "${args[@]}" >/dev/null; else mpirun -np "$np" "$BIN" "${args[@]}" >/dev/null; fi
}

same_run() { # run-a run-b step what: metrics (all but timing/memory/comm figures) and checkpoint files equal
    python3 - "$work/$1" "$work/$2" "$3" "$4" <<'EOF'
import hashlib, json, sys, os
a, b, step, what = sys.argv[1:]
skip = {"tokens_per_s", "step_time_s", "elapsed_s", "peak_memory_mib", "peak_memory_by_category", "comm_s"}
def records(run):
    out = {}
    for line in open(os.path.join(run, "metrics.jsonl")):
        r = json.loads(line)
        key = (r["step"], "val_loss" in r)
        out[key] = {k: v for k, v in r.items() if k not in skip}
    return out
ra, rb = records(a), records(b)
if ra != rb:
    for k in sorted(set(ra) | set(rb)):
        if ra.get(k) != rb.get(k):
            sys.exit(f"FAIL {what}: metrics differ at step {k[0]}: {ra.get(k)} vs {rb.get(k)}")
ck = lambda run, f: hashlib.sha256(open(os.path.join(run, "checkpoints", f"step_{int(step):06d}", f), "rb").read()).hexdigest()
for f in ["model.safetensors", "optim.safetensors", "state.json"]:
    if ck(a, f) != ck(b, f):
        sys.exit(f"FAIL {what}: {f} of step {step} differs")
print(f"ok   {what}: {len(ra)} metrics records and the step {step} checkpoint bitwise equal")
EOF
}

# Resuming at 4 ranks splits each step's sequences differently (4 micro-batches of 1 sequence,
# each its own mean, instead of 2 of 2): the gradient is the same sum in another f32 order, a
# relative difference of a few ε_f32 = 6e-8 per step. Two steps of AdamW/Muon from there move
# the weights by lr-sized steps whose direction can flip only where a gradient entry is within
# that rounding of 0 (AdamW's g/√v), so weights and state are compared at |Δ| ≤ 1e-3 (the
# largest per-step move, lr × a few, bounds a flipped entry's error) and losses at 1e-5 relative.
close_run() { # run-a run-b step what
    python3 - "$work/$1" "$work/$2" "$3" "$4" <<'EOF'
import array, json, os, struct, sys
a, b, step, what = sys.argv[1:]
def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "loss" in r}
la, lb = losses(a), losses(b)
assert la.keys() == lb.keys(), (la.keys(), lb.keys())
worst_loss = max(abs(la[k] - lb[k]) / abs(la[k]) for k in la)
def tensors(run, f):
    raw = open(os.path.join(run, "checkpoints", f"step_{int(step):06d}", f), "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    out = {}
    for name, t in head.items():
        if name != "__metadata__":
            s, e = t["data_offsets"]
            out[name] = array.array("f", raw[8 + n + s:8 + n + e])
    return out
worst = 0.0
for f in ["model.safetensors", "optim.safetensors"]:
    ta, tb = tensors(a, f), tensors(b, f)
    assert ta.keys() == tb.keys()
    for k in ta:
        worst = max([worst] + [abs(x - y) for x, y in zip(ta[k], tb[k])])
if worst_loss > 1e-5 or worst > 1e-3:
    sys.exit(f"FAIL {what}: loss rel. diff {worst_loss:.2e}, weights/state max |diff| {worst:.2e}")
print(f"ok   {what}: loss rel. diff {worst_loss:.2e} ≤ 1e-5, weights and state max |diff| {worst:.2e} ≤ 1e-3")
EOF
}

for kind in D W S MoE MLA; do
    read -r -a flags <<<"${KIND[$kind]}"
    train 0 "$kind-a2" 4 2 --save-every 2 "${flags[@]}"
    train 2 "$kind-np2" 4 2 --save-every 2 "${flags[@]}"
    same_run "$kind-a2" "$kind-np2" 4 "$kind: mpirun -np 2 vs 2 micro-batches"
    train 0 "$kind-a4" 3 4 "${flags[@]}"
    train 4 "$kind-np4" 3 4 "${flags[@]}"
    same_run "$kind-a4" "$kind-np4" 3 "$kind: mpirun -np 4 vs 4 micro-batches"
    # resume the -np 2 run's step-2 checkpoint at 1 rank (2 micro-batches: bitwise) and at 4
    # (the same 256 tokens per step as 4 ranks × 1 sequence: within the tolerance below)
    for np in 1 4; do
        cp -a "$work/$kind-np2" "$work/$kind-r$np"
        rm -r "$work/$kind-r$np/checkpoints/step_000004"
        if [[ $np == 1 ]]; then
            "$BIN" train "${RESUME[@]}" --run "$kind-r$np" --resume-from-step 2 >/dev/null 2>&1
            same_run "$kind-np2" "$kind-r$np" 4 "$kind: saved at -np 2, resumed at -np 1"
        else
            sed -i 's/"device_batch_size": 2/"device_batch_size": 1/' "$work/$kind-r$np/config.json"
            mpirun -np 4 "$BIN" train "${RESUME[@]}" --run "$kind-r$np" --resume-from-step 2 >/dev/null 2>&1
            close_run "$kind-np2" "$kind-r$np" 4 "$kind: saved at -np 2, resumed at -np 4"
        fi
    done
done

# MTP modules share the embedding and the head, which so get two gradient contributions per
# micro-batch, each added in place: one process's ((a0 + b0) + a1) + b1 is not the ranks'
# (a0 + b0) + (a1 + b1), so here the tolerance above applies
train 0 MTP-a2 3 2 --mtp-depth 1
train 2 MTP-np2 3 2 --mtp-depth 1
close_run MTP-a2 MTP-np2 3 "MTP (depth 1): mpirun -np 2 vs 2 micro-batches"

# comm_s is logged at several ranks only
grep -q '"comm_s"' "$work/D-np2/metrics.jsonl" || { echo "FAIL: no comm_s in a 2-rank run's metrics" >&2; exit 1; }
! grep -q '"comm_s"' "$work/D-a2/metrics.jsonl" || { echo "FAIL: comm_s in a single process's metrics" >&2; exit 1; }

# throughput accounting: dist.json holds tokens/s and MFU for the job and each rank
python3 - "$work/D-np2/dist.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
ok = 0 < d["mfu"] < 1 and len(d["ranks"]) == 2 and all(0 < r["mfu"] < 1 and r["tokens_per_s"] > 0 for r in d["ranks"])
if not ok:
    sys.exit(f"FAIL: dist.json lacks a job or per-rank MFU in (0, 1): {d}")
print(f"ok   dist.json: job {d['tokens_per_s']:.0f} tokens/s, MFU {100 * d['mfu']:.1f}%; per rank " + ", ".join(f"{100 * r['mfu']:.1f}%" for r in d["ranks"]))
EOF

# per-rank optimizer state: measured (dist.json, from the memory accounting) vs predicted
read -r -a moe <<<"${KIND[MoE]}"
for np in 1 2 4; do
    train "$np" "mem$np" 1 4 "${moe[@]}"
    predicted=$("$BIN" info "${MODEL[@]}" "${moe[@]}" --world-size "$np" | sed -n 's/^ *optimizer state per rank: //p')
    measured=$(python3 -c 'import json,sys; print(" ".join(str(r["optimizer_state_bytes"]) for r in json.load(open(sys.argv[1]))["ranks"]))' "$work/mem$np/dist.json")
    [[ "$predicted" == "$measured bytes" ]] || { echo "FAIL: optimizer state per rank at $np: measured $measured, predicted $predicted" >&2; exit 1; }
    echo "ok   optimizer state per rank at $np rank(s): $measured bytes (as predicted)"
done

rank_pid() { # run-name rank: the PID of that rank's process
    local p
    for p in $(pgrep -f "nanoseek train .*--run $1 "); do
        if tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$2"; then
            echo "$p"
            return
        fi
    done
}
wait_for() { # file: waits up to 120 s for it to exist
    local _
    for _ in $(seq 1200); do
        [[ -e $1 ]] && return
        sleep 0.1
    done
    echo "FAIL: $1 never appeared" >&2
    exit 1
}

# SIGKILL of rank 1 mid-run: mpirun ends the job non-zero, every checkpoint folder stays complete
mpirun -np 2 "$BIN" train "${COMMON[@]}" --run kill --num-iterations 100000 --total-batch-size 256 --save-every 3 \
    --eval-every 0 >"$work/kill.log" 2>&1 &
job=$!
wait_for "$work/kill/checkpoints/step_000006"
kill -9 "$(rank_pid kill 1)"
rc=0
wait "$job" || rc=$?
[[ $rc != 0 ]] || { echo "FAIL: the job with a killed rank exited 0" >&2; exit 1; }
python3 - "$work/kill/checkpoints" <<'EOF'
import hashlib, json, os, sys
root = sys.argv[1]
steps = sorted(d for d in os.listdir(root) if d.startswith("step_"))
assert steps, "no checkpoint"
for d in steps:
    sums = json.load(open(os.path.join(root, d, "checksums.json")))["files"]
    for name, digest in sums.items():
        if hashlib.sha256(open(os.path.join(root, d, name), "rb").read()).hexdigest() != digest:
            sys.exit(f"FAIL: {d}/{name} does not match its checksum")
print(f"ok   rank 1 killed: mpirun exited non-zero; {len(steps)} checkpoint folder(s) ({', '.join(steps)}), every one complete")
EOF

# SIGSTOP of rank 1: rank 0 waits in a collective and the 3 s timeout ends the job
mpirun -np 2 "$BIN" train "${COMMON[@]}" --run stall --num-iterations 100000 --total-batch-size 256 --save-every 2 \
    --eval-every 0 --collective-timeout 3 >"$work/stall.log" 2>&1 &
job=$!
wait_for "$work/stall/checkpoints/step_000002"
victim=$(rank_pid stall 1)
kill -STOP "$victim"
rc=0
wait "$job" || rc=$?
kill -KILL "$victim" 2>/dev/null || true
grep -q "did not complete within 3 s" "$work/stall.log" || { echo "FAIL: no collective timeout" >&2; cat "$work/stall.log" >&2; exit 1; }
[[ $rc != 0 ]] || { echo "FAIL: the stalled job exited 0" >&2; exit 1; }
echo "ok   rank 1 stalled: $(grep -m1 -o 'collective [a-z_]* did not complete within 3 s' "$work/stall.log"), mpirun exited $rc"
echo "check-data-parallel: all checks passed"
