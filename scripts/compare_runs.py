#!/usr/bin/env python3
"""Compares two nanoseek training runs step by step and reports the throughput of the second.

    python3 scripts/compare_runs.py CPU_RUN_DIR CUDA_RUN_DIR [--peak-tflops 790] [--out F.json]

Reads each run's metrics.jsonl (one JSON object per line; train lines carry `step`, `loss`,
`tokens_per_s`) and config.json. Prints the per-step losses side by side with their relative
difference, and for the second run the median tokens/s after its first 3 steps and the MFU:
model FLOPs per token = 6·N (N = the weights of every matmul: attention, FFN, lm_head) plus
6·L·q_dim·T for causal attention (QKᵀ and PV, forward and backward, half the T×T scores),
times tokens/s, over the peak (the bf16 GEMM ceiling).
"""
import json
import statistics
import sys


def load(run):
    rows = []
    with open(f"{run}/metrics.jsonl") as f:
        for line in f:
            line = line.strip()
            if line:
                r = json.loads(line)
                if "loss" in r and "step" in r:
                    rows.append(r)
    with open(f"{run}/config.json") as f:
        cfg = json.load(f)
    return rows, cfg.get("model", cfg)


def flops_per_token(m):
    d, L, T = m["n_embd"], m["n_layer"], m["max_seq_len"]
    q_dim = m["n_head"] * m["head_dim"]
    kv_dim = m["n_kv_head"] * m["head_dim"]
    per_layer = d * q_dim + 2 * d * kv_dim + q_dim * d + 3 * d * m["ffn_hidden"]
    n = L * per_layer + m["vocab_size"] * d
    return 6 * n + 6 * L * q_dim * T


def main():
    args = [a for a in sys.argv[1:]]
    peak, out = 790.0, None
    if "--peak-tflops" in args:
        i = args.index("--peak-tflops")
        peak = float(args[i + 1])
        del args[i : i + 2]
    if "--out" in args:
        i = args.index("--out")
        out = args[i + 1]
        del args[i : i + 2]
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    (ref, _), (run, cfg) = load(args[0]), load(args[1])
    report = {"reference": args[0], "run": args[1], "steps": []}
    print(f"{'step':>5} {'reference loss':>15} {'run loss':>10} {'rel diff':>9}")
    by_step = {r["step"]: r for r in ref}
    for r in run:
        a = by_step.get(r["step"])
        if a is None:
            continue
        rel = abs(r["loss"] - a["loss"]) / max(abs(a["loss"]), 1e-12)
        report["steps"].append({"step": r["step"], "reference": a["loss"], "run": r["loss"], "rel_diff": rel})
        print(f"{r['step']:>5} {a['loss']:>15.5f} {r['loss']:>10.5f} {rel:>9.2e}")
    tps = [r["tokens_per_s"] for r in run if r["step"] > 3 and "tokens_per_s" in r]
    if tps:
        t = statistics.median(tps)
        fpt = flops_per_token(cfg)
        mfu = t * fpt / (peak * 1e12)
        report.update(tokens_per_s=t, flops_per_token=fpt, peak_tflops=peak, mfu=mfu)
        print(f"run: {t:,.0f} tokens/s (median after step 3), {fpt / 1e9:.2f} GFLOP/token, MFU {100 * mfu:.1f}% of {peak:.0f} TFLOP/s")
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
