#!/usr/bin/env python3
"""PyTorch baselines for the CUDA kernel benches (run on the GPU machine).

Times torch.matmul (cuBLAS) in bf16, a linear layer with a residual add (addmm)
and with SwiGLU (eager and compiled), scaled_dot_product_attention (flash
backend, causal) forward and forward+backward, and eager and torch.compile'd
RoPE, RoPE fused with QK-norm (forward), RMSNorm and softcap cross-entropy, at
the engine's shapes; then the sparse baselines (flex_attention with a window +
global block mask, dense SDPA at long T, a PyTorch MoE layer, see
sparse_baselines). Prints a table and writes JSON: for each case the shape,
median milliseconds, and the achieved TFLOP/s or GB/s.

The JSON ({"device", "torch", "cases": [...]}, what `nanoseek bench --baseline` reads) is
rewritten atomically after every case, so a run killed by a timeout keeps every finished
case. Once --budget-s seconds have passed, no further case starts: the file records
"skipped": "over total budget" and the script exits 0 with what it has.

    python3 scripts/torch_baselines.py [--out FILE.json] [--quick] [--budget-s SECONDS]
"""
import argparse
import json
import os
import sys
import time

# time.monotonic() after which no case starts (set by main from --budget-s).
DEADLINE = None


class OverBudget(BaseException):
    """The total budget is spent. A BaseException, so the `except Exception` around optional
    baselines does not swallow it."""


def bench(fn, warmup=3, iters=20):
    import torch

    if DEADLINE is not None and time.monotonic() > DEADLINE:
        raise OverBudget()

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def rope(x, cos, sin):
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    return torch_cat(x1 * cos - x2 * sin, x1 * sin + x2 * cos).to(x.dtype)


def torch_cat(a, b):
    import torch

    return torch.cat([a, b], dim=-1)


def rmsnorm(x, eps=1e-6):
    xf = x.float()
    return (xf * (xf.pow(2).mean(-1, keepdim=True) + eps).rsqrt()).to(x.dtype)


def rope_qknorm(x, cos, sin, eps=1e-6):
    """QK-norm (parameter-free RMSNorm over the head dim) then RoPE, in f32, one bf16 rounding."""
    xf = x.float()
    xf = xf * (xf.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    d = xf.shape[-1] // 2
    x1, x2 = xf[..., :d], xf[..., d:]
    return torch_cat(x1 * cos - x2 * sin, x1 * sin + x2 * cos).to(x.dtype)


def softcap_ce(z, y, cap=15.0):
    import torch.nn.functional as F

    zc = cap * (z.float() / cap).tanh()
    return F.cross_entropy(zc, y)


def epilogue_baselines(record, bench):
    """The GEMMs whose epilogues the engine fuses, at the small model's FFN shapes (x @ w.T): the
    residual add after w_down (addmm: cuBLAS adds it in its epilogue), SwiGLU after w_up, and
    SwiGLU's backward after dy @ w_down; eager and compiled. Run last: the compiles are slow and
    the GPU check's timeout should cut these before the attention and MoE baselines."""
    import torch
    import torch.nn.functional as F

    dev, bf = "cuda", torch.bfloat16
    m, f, c = 16384, 3072, 768
    a, w, r = (torch.randn(m, f, device=dev, dtype=bf), torch.randn(c, f, device=dev, dtype=bf),
               torch.randn(m, c, device=dev, dtype=bf))
    record("gemm", "torch addmm residual", [m, c, f], bench(lambda: torch.addmm(r, a, w.t())), flops=2 * m * c * f)
    h, wu, g = (torch.randn(m, c, device=dev, dtype=bf), torch.randn(f, c, device=dev, dtype=bf),
                torch.randn(m, f, device=dev, dtype=bf))

    def linear_swiglu(h, wu, g):
        return F.silu(g) * (h @ wu.t())

    def matmul_swiglu_bwd(dy, wd, g, u):  # SwiGLU's backward after da = dy @ w_down
        da = (dy @ wd).float()
        s = torch.sigmoid(g.float())
        gf = g.float()
        return (da * u.float() * s * (1 + gf * (1 - s))).to(bf), (da * gf * s).to(bf)

    dy, wd = torch.randn(m, c, device=dev, dtype=bf), torch.randn(c, f, device=dev, dtype=bf)
    u = torch.randn(m, f, device=dev, dtype=bf)
    for mode in ["eager", "compiled"]:
        fn = linear_swiglu if mode == "eager" else torch.compile(linear_swiglu)
        record("gemm", f"torch linear+swiglu {mode}", [m, f, c], bench(lambda: fn(h, wu, g)), flops=2 * m * f * c)
        bwd = matmul_swiglu_bwd if mode == "eager" else torch.compile(matmul_swiglu_bwd)
        record("gemm", f"torch matmul+swiglu bwd {mode}", [m, f, c], bench(lambda: bwd(dy, wd, g, u)),
               flops=2 * m * f * c)


def sparse_baselines(args, record, bench):
    """Baselines of the sparse-attention and MoE kernels (issue 7): window + global attention
    with flex_attention's block mask and with dense SDPA, dense SDPA at DSA's lengths, and a
    straightforward PyTorch MoE layer (a loop over experts, and torch._grouped_mm if present)
    beside a dense SwiGLU FFN with the same active FLOPs. All forward + backward, bf16."""
    import torch
    import torch.nn.functional as F

    dev, bf = "cuda", torch.bfloat16
    b, h, d, window, n_global = 1, 16, 128, 1024, 64
    lengths = [4096, 16384] if args.quick else [4096, 16384, 65536]
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention)
    except Exception as e:  # noqa: BLE001 - report and go on without flex
        print(f"torch_baselines: flex_attention unavailable ({e})", file=sys.stderr)
        flex = None

    def window_mask(bi, hi, q, k):
        return (k <= q) & ((q - k < window) | (k < n_global))

    for t in lengths:
        q, k, v = (torch.randn(b, h, t, d, device=dev, dtype=bf, requires_grad=True) for _ in range(3))
        g = torch.randn(b, h, t, d, device=dev, dtype=bf)
        # visited (unmasked) score entries: a window of `window` plus the global prefix
        visible = sum(min(i + 1, window) + max(0, min(n_global, i + 1 - window)) for i in range(t))
        flops = 3.5 * 4 * b * h * visible * d

        def dense():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)

        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            ms = bench(dense, warmup=2, iters=5)
        dense_flops = 3.5 * 4 * b * h * t * (t + 1) / 2 * d
        record("attention", "sdpa fwd+bwd", [b, t, h, d], ms, flops=dense_flops)
        if flex is not None:
            mask = create_block_mask(window_mask, B=None, H=None, Q_LEN=t, KV_LEN=t)

            def windowed():
                flex(q, k, v, block_mask=mask).backward(g)

            record("window", "flex_attention fwd+bwd", [b, t, h, d, window, n_global],
                   bench(windowed, warmup=2, iters=5), flops=flops)
        del q, k, v, g
    torch.cuda.empty_cache()

    # MoE layer: tokens n, width dm, E experts of hidden f, top-k, sigmoid scores
    n, dm, experts, f, topk = (8192, 1024, 16, 512, 2) if args.quick else (16384, 2048, 64, 704, 2)
    x = torch.randn(n, dm, device=dev, dtype=bf, requires_grad=True)
    wr = torch.randn(experts, dm, device=dev, dtype=bf) / dm ** 0.5
    wg, wu = (torch.randn(experts, f, dm, device=dev, dtype=bf, requires_grad=True) / dm ** 0.5 for _ in range(2))
    wd = (torch.randn(experts, dm, f, device=dev, dtype=bf) / f ** 0.5).requires_grad_()
    gy = torch.randn(n, dm, device=dev, dtype=bf)
    active = 2 * 3 * n * topk * dm * f * 3  # fwd + bwd (x3) of three GEMMs per kept assignment

    def route():
        s = torch.sigmoid((x @ wr.T).float())
        gate, idx = s.topk(topk, dim=-1)
        return (gate / gate.sum(-1, keepdim=True)).to(bf), idx

    def moe_loop():
        gate, idx = route()
        y = torch.zeros_like(x)
        for e in range(experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            xe = x[tok]
            he = F.silu(xe @ wg[e].T) * (xe @ wu[e].T)
            y = y.index_add(0, tok, (he @ wd[e].T) * gate[tok, slot, None])
        y.backward(gy)

    shape = [n, dm, experts, f, topk]
    record("moe", "torch loop fwd+bwd", shape, bench(moe_loop, warmup=2, iters=5), flops=active)
    if hasattr(torch, "_grouped_mm"):
        def moe_grouped():
            gate, idx = route()
            order = idx.flatten().argsort()
            tok = order // topk
            counts = torch.bincount(idx.flatten(), minlength=experts)
            offs = counts.cumsum(0).to(torch.int32)
            xs = x[tok]
            hg = torch._grouped_mm(xs, wg.transpose(1, 2), offs=offs)
            hu = torch._grouped_mm(xs, wu.transpose(1, 2), offs=offs)
            ys = torch._grouped_mm(F.silu(hg) * hu, wd.transpose(1, 2), offs=offs)
            y = torch.zeros_like(x).index_add(0, tok, ys * gate.flatten()[order, None])
            y.backward(gy)

        try:
            record("moe", "torch grouped_mm fwd+bwd", shape, bench(moe_grouped, warmup=2, iters=5), flops=active)
        except Exception as e:  # noqa: BLE001
            print(f"torch_baselines: torch._grouped_mm failed ({e})", file=sys.stderr)
    # the dense SwiGLU FFN with the same active FLOPs (hidden topk * f)
    dg, du = (torch.randn(topk * f, dm, device=dev, dtype=bf, requires_grad=True) for _ in range(2))
    dd = torch.randn(dm, topk * f, device=dev, dtype=bf, requires_grad=True)

    def dense_ffn():
        ((F.silu(x @ dg.T) * (x @ du.T)) @ dd.T).backward(gy)

    record("moe", "dense ffn fwd+bwd", shape, bench(dense_ffn, warmup=2, iters=5), flops=active)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="torch_baselines.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="start no case after this many seconds (default 200)")
    args = ap.parse_args()
    if not args.budget_s > 0:
        print(f"error: --budget-s must be positive, not {args.budget_s}", file=sys.stderr)
        return 2
    global DEADLINE
    DEADLINE = time.monotonic() + args.budget_s
    import torch

    if not torch.cuda.is_available():
        print("torch_baselines: no CUDA device", file=sys.stderr)
        return 1
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "quick": args.quick,
               "budget_s": args.budget_s, "cases": []}

    def save():
        # write a temporary file and rename it: a kill mid-write never leaves a torn JSON
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.out)

    def record(kind, name, shape, ms, flops=None, nbytes=None):
        r = {"kind": kind, "name": name, "shape": shape, "ms": ms}
        if flops:
            r["tflops"] = flops / ms / 1e9
        if nbytes:
            r["gbps"] = nbytes / ms / 1e6
        results["cases"].append(r)
        rate = f"{r['tflops']:.1f} TFLOP/s" if flops else f"{r['gbps']:.0f} GB/s"
        print(f"{kind:10s} {name:28s} {str(shape):32s} {ms:8.3f} ms  {rate}", flush=True)
        save()  # after every case, so a timeout keeps what was measured

    save()
    try:
        all_cases(args, record)
    except OverBudget:
        results["skipped"] = "over total budget"
        print(f"torch_baselines: --budget-s {args.budget_s:g} spent; the remaining cases are skipped",
              file=sys.stderr)
    save()
    print(f"torch_baselines: wrote {args.out} ({len(results['cases'])} cases)")
    return 0


def all_cases(args, record):
    import torch
    import torch.nn.functional as F

    dev, bf = "cuda", torch.bfloat16

    # GEMM (cuBLAS): 4096^3 and the small/medium training shapes (tokens x n_embd x out)
    gemms = [(4096, 4096, 4096), (16384, 768, 3072), (16384, 3072, 768), (16384, 1024, 4096)]
    for m, n, k in gemms[:2] if args.quick else gemms:
        a, b = torch.randn(m, k, device=dev, dtype=bf), torch.randn(k, n, device=dev, dtype=bf)
        record("gemm", "torch.matmul", [m, n, k], bench(lambda: a @ b), flops=2 * m * n * k)

    # copy ceiling
    x = torch.empty(1 << 28, device=dev, dtype=torch.uint8)
    y = torch.empty_like(x)
    record("copy", "copy_", [x.numel()], bench(lambda: y.copy_(x)), nbytes=2 * x.numel())

    # attention: SDPA (flash backend), causal, GQA expanded
    for b, t, h, d in [(8, 1024, 12, 64), (2, 4096, 16, 64), (1, 8192, 16, 128)]:
        q = torch.randn(b, h, t, d, device=dev, dtype=bf, requires_grad=True)
        k = torch.randn(b, h, t, d, device=dev, dtype=bf, requires_grad=True)
        v = torch.randn(b, h, t, d, device=dev, dtype=bf, requires_grad=True)
        flops = 4 * b * h * t * t * d / 2
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            record("attention", "sdpa fwd", [b, t, h, d],
                   bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), flops=flops)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            g = torch.randn_like(o)

            def fb():
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                out.backward(g)

            record("attention", "sdpa fwd+bwd", [b, t, h, d], bench(fb), flops=3.5 * flops)

    # RoPE, RMSNorm, cross-entropy: eager and compiled
    b, t, h, d = 8, 1024, 12, 64
    xq = torch.randn(b, t, h, d, device=dev, dtype=bf)
    ang = torch.arange(t, device=dev)[:, None] * (10000.0 ** (-2 * torch.arange(d // 2, device=dev) / d))[None]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    xn = torch.randn(b * t, 768, device=dev, dtype=bf)
    g, bt = torch.randn(768, device=dev, dtype=bf), torch.randn(768, device=dev, dtype=bf)
    z = torch.randn(8192, 65536 if not args.quick else 8192, device=dev, dtype=bf)
    yt = torch.randint(0, z.shape[1], (z.shape[0],), device=dev)
    for mode in ["eager", "compiled"]:
        wrap = (lambda f: f) if mode == "eager" else (lambda f: torch.compile(f))
        r, n, c, rq = wrap(rope), wrap(rmsnorm), wrap(softcap_ce), wrap(rope_qknorm)
        ln = wrap(torch.nn.functional.layer_norm)
        record("rope", f"rope {mode}", list(xq.shape), bench(lambda: r(xq, cos, sin)), nbytes=2 * xq.numel() * 2)
        record("rope", f"rope+qknorm {mode}", list(xq.shape), bench(lambda: rq(xq, cos, sin)),
               nbytes=2 * xq.numel() * 2)
        record("rmsnorm", f"rmsnorm {mode}", list(xn.shape), bench(lambda: n(xn)), nbytes=2 * xn.numel() * 2)
        record("layernorm", f"layernorm {mode}", list(xn.shape), bench(lambda: ln(xn, (768,), g, bt, 1e-6)),
               nbytes=2 * xn.numel() * 2)
        record("loss", f"softcap_ce {mode}", list(z.shape), bench(lambda: c(z, yt)), nbytes=z.numel() * 2)

    # the residual add (the engine's axpby): 2 tensors read, 1 written
    xa, xb = torch.randn(1 << 26, device=dev, dtype=bf), torch.randn(1 << 26, device=dev, dtype=bf)
    xo = torch.empty_like(xa)
    record("elementwise", "add eager", [xa.numel()], bench(lambda: torch.add(xa, xb, out=xo)), nbytes=3 * 2 * xa.numel())

    sparse_baselines(args, record, bench)
    epilogue_baselines(record, bench)


if __name__ == "__main__":
    sys.exit(main())
