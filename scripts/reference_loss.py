#!/usr/bin/env python3
"""Independent NumPy (float64) reference for the nanoseek model's loss.

Written from docs/model.md alone (not from the Rust code), so that CI can check
that the engine computes the model the page describes. See
scripts/check-reference.sh for how it is used.

Usage:
    reference_loss.py CKPT_DIR SHARD [--eval-tokens N] [--batch-size B]
        Mean next-token cross-entropy of the checkpoint on the shard, over the
        same sequential windows as `nanoseek eval`; prints
        {"loss": ..., "tokens": ...} as JSON.

    reference_loss.py --write-shard OUT --vocab V --n N --seed S [--max-id M]
        Write a token shard of N ids drawn from a deterministic Markov chain
        over ids < M (default V), for testing.

Token shard format (little-endian): magic b"NSEEKTOK" (8 bytes), version u32 = 1,
token width u32 (2: uint16 ids, 4: uint32 ids), vocab size u64, token count u64,
then the ids.
"""

import argparse
import json
import math
import struct
import sys

import numpy as np

MAGIC = b"NSEEKTOK"
HEADER_LEN = 32
RMS_EPS = 1e-6
LAYERNORM_EPS = 1e-6  # the V3.2 indexer's key norm
CONFIG_KEYS = {
    "vocab_size",
    "n_layer",
    "n_embd",
    "n_head",
    "n_kv_head",
    "head_dim",
    "ffn_hidden",
    "max_seq_len",
    "rope_theta",
    "logit_softcap",
    "attn_pattern",
    "dsa_window_size",
    "n_global",
    "index_n_heads",
    "index_head_dim",
    "index_topk",
    "index_local_window",
    "dsa_warmup_steps",
    "moe",
    "mtp_depth",
    "mtp_lambda",
    "mtp_lambda_final",
    "mtp_lambda_switch",
    "attention",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "indexer",
    "index_rope_dim",
}
MOE_KEYS = {
    "n_routed_experts",
    "n_shared_experts",
    "top_k",
    "moe_inter_dim",
    "first_k_dense",
    "score_func",
    "routed_scaling_factor",
    "n_group",
    "topk_group",
    "bias_update_speed",
    "seq_aux_alpha",
    "expert_capacity_factor",
}
# Fields docs/model.md gives defaults for when a checkpoint predates them.
CONFIG_DEFAULTS = {
    "attn_pattern": "D",
    "dsa_window_size": 256,
    "n_global": 4,
    "index_n_heads": 4,
    "index_head_dim": 32,
    "index_topk": 256,
    "index_local_window": 0,
    "dsa_warmup_steps": 0,
    "moe": {"n_routed_experts": 0},
    "mtp_depth": 0,
    "mtp_lambda": 0.3,
    "mtp_lambda_final": None,
    "mtp_lambda_switch": 2.0 / 3.0,
    "attention": "gqa",
    "q_lora_rank": 0,
    "kv_lora_rank": 0,
    "qk_nope_head_dim": 0,
    "qk_rope_head_dim": 0,
    "v_head_dim": 0,
    "indexer": "gqa",
    "index_rope_dim": None,
}


def die(msg):
    print(f"reference_loss.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------- token shards


def read_shard(path):
    with open(path, "rb") as f:
        header = f.read(HEADER_LEN)
        if len(header) < HEADER_LEN or header[:8] != MAGIC:
            die(f"{path}: not a nanoseek token shard (bad magic)")
        version, width, vocab, count = struct.unpack("<IIQQ", header[8:])
        if version != 1:
            die(f"{path}: unsupported shard version {version}")
        dtype = {2: "<u2", 4: "<u4"}.get(width)
        if dtype is None:
            die(f"{path}: unsupported token width {width}")
        tokens = np.fromfile(f, dtype=dtype, count=count)
    if tokens.size != count:
        die(f"{path}: header says {count} tokens, file holds {tokens.size}")
    return tokens.astype(np.int64), vocab


def write_shard(path, tokens, vocab):
    tokens = np.asarray(tokens)
    if tokens.size and int(tokens.max()) >= vocab:
        die("token id >= vocab")
    if vocab <= 65536:
        width, data = 2, tokens.astype("<u2")
    else:
        width, data = 4, tokens.astype("<u4")
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<IIQQ", 1, width, vocab, tokens.size))
        f.write(data.tobytes())


def markov_tokens(n, n_ids, seed):
    """A deterministic, structured (far from uniform) token stream.

    Each id has 4 fixed successors taken with probabilities 0.55/0.2/0.1/0.05;
    with probability 0.1 the chain jumps to a Zipf-like (1/rank) random id.
    """
    rng = np.random.default_rng(seed)
    succ = rng.integers(0, n_ids, size=(n_ids, 4))
    zipf_p = 1.0 / np.arange(1, n_ids + 1)
    zipf_p /= zipf_p.sum()
    zipf_ids = rng.permutation(n_ids)
    branch = rng.choice(5, size=n, p=[0.55, 0.2, 0.1, 0.05, 0.1])
    jumps = zipf_ids[rng.choice(n_ids, size=n, p=zipf_p)]
    out = np.empty(n, dtype=np.int64)
    cur = int(jumps[0])
    for i in range(n):
        out[i] = cur
        b = branch[i]
        cur = int(jumps[i]) if b == 4 else int(succ[cur, b])
    return out


# ---------------------------------------------------------------- checkpoint


def load_checkpoint(ckpt_dir):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = f"{ckpt_dir.rstrip('/')}/model.safetensors"
    with safe_open(path, "np") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        die(f"{path}: no 'config' metadata")
    cfg = {**CONFIG_DEFAULTS, **json.loads(meta["config"])}
    unknown = set(cfg) - CONFIG_KEYS
    missing = CONFIG_KEYS - set(cfg)
    if unknown or missing:
        # docs/model.md describes exactly these fields (the dense model); anything
        # else would be architecture this reference does not know how to compute.
        die(
            f"config fields differ from docs/model.md: unknown {sorted(unknown)}, "
            f"missing {sorted(missing)}"
        )

    if cfg["attention"] not in ("gqa", "mla"):
        die(f"attention {cfg['attention']!r}: docs/model.md defines \"gqa\" and \"mla\"")
    if cfg["indexer"] not in ("gqa", "v32"):
        die(f"indexer {cfg['indexer']!r}: this reference knows \"gqa\" and \"v32\"")
    mla = cfg["attention"] == "mla"
    if mla:
        for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if cfg[k] <= 0:
                die(f"MLA checkpoint with {k} = {cfg[k]} (must be positive)")
        if cfg["qk_rope_head_dim"] % 2:
            die(f"qk_rope_head_dim {cfg['qk_rope_head_dim']} is odd (RoPE needs pairs)")
    if cfg["indexer"] == "v32" and "S" in cfg["attn_pattern"]:
        r = cfg["index_rope_dim"] or 0
        if r == 0:  # 0 = derived: d_I/2 rounded down to even
            r = cfg["index_head_dim"] // 2 // 2 * 2
        if r <= 0 or r % 2 or r > cfg["index_head_dim"]:
            die(f"v32 indexer: index_rope_dim {r} must be even and in 2..=index_head_dim")
        cfg["index_rope_dim"] = r

    moe = cfg["moe"]
    if moe.get("n_routed_experts", 0) > 0 and set(moe) != MOE_KEYS:
        die(f"moe fields differ from docs/model.md: {sorted(set(moe) ^ MOE_KEYS)}")

    # the MTP modules (docs/model.md) take no part in the model's own loss, which is scored here
    raw = {k: v for k, v in load_file(path).items() if not k.startswith("mtp.")}
    V, C, L = cfg["vocab_size"], cfg["n_embd"], cfg["n_layer"]
    H, Hkv, d, F = cfg["n_head"], cfg["n_kv_head"], cfg["head_dim"], cfg["ffn_hidden"]
    expected = {"wte.weight": (V, C), "lm_head.weight": (V, C)}
    for l in range(L):
        p = f"blocks.{l}."
        if mla:
            dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
            rq, rkv = cfg["q_lora_rank"], cfg["kv_lora_rank"]
            if rq > 0:
                expected[p + "attn.wq_a.weight"] = (rq, C)
                expected[p + "attn.wq_b.weight"] = (H * (dn + dr), rq)
            else:
                expected[p + "attn.wq.weight"] = (H * (dn + dr), C)
            expected[p + "attn.wkv_a.weight"] = (rkv + dr, C)
            expected[p + "attn.wkv_b.weight"] = (H * (dn + dv), rkv)
            expected[p + "attn.c_proj.weight"] = (C, H * dv)
        else:
            expected[p + "attn.c_q.weight"] = (H * d, C)
            expected[p + "attn.c_k.weight"] = (Hkv * d, C)
            expected[p + "attn.c_v.weight"] = (Hkv * d, C)
            expected[p + "attn.c_proj.weight"] = (C, H * d)
        if cfg["attn_pattern"][l % len(cfg["attn_pattern"])] == "S":
            HI, dI = cfg["index_n_heads"], cfg["index_head_dim"]
            if cfg["indexer"] == "v32":
                # the index query reads MLA's query latent when there is one
                if mla and cfg["q_lora_rank"] > 0:
                    expected[p + "attn.indexer.wq_b.weight"] = (HI * dI, cfg["q_lora_rank"])
                else:
                    expected[p + "attn.indexer.wq.weight"] = (HI * dI, C)
                expected[p + "attn.indexer.wk.weight"] = (dI, C)
                expected[p + "attn.indexer.k_norm.weight"] = (dI,)
                expected[p + "attn.indexer.k_norm.bias"] = (dI,)
            else:
                expected[p + "attn.indexer.wq.weight"] = (HI * dI, C)
                expected[p + "attn.indexer.wk.weight"] = (dI, C)
            expected[p + "attn.indexer.w_heads.weight"] = (HI, C)
        if is_moe_layer(cfg, l):
            E, Fe, S = moe["n_routed_experts"], moe["moe_inter_dim"], moe["n_shared_experts"]
            expected[p + "mlp.router.weight"] = (E, C)
            expected[p + "mlp.router.bias"] = (E,)
            expected[p + "mlp.experts.w_gate.weight"] = (E, Fe, C)
            expected[p + "mlp.experts.w_up.weight"] = (E, Fe, C)
            expected[p + "mlp.experts.w_down.weight"] = (E, C, Fe)
            if S > 0:
                expected[p + "mlp.shared.w_gate.weight"] = (S * Fe, C)
                expected[p + "mlp.shared.w_up.weight"] = (S * Fe, C)
                expected[p + "mlp.shared.w_down.weight"] = (C, S * Fe)
        else:
            expected[p + "mlp.w_gate.weight"] = (F, C)
            expected[p + "mlp.w_up.weight"] = (F, C)
            expected[p + "mlp.w_down.weight"] = (C, F)
    if set(raw) != set(expected):
        die(
            f"tensor names differ from docs/model.md: extra {sorted(set(raw) - set(expected))}, "
            f"missing {sorted(set(expected) - set(raw))}"
        )
    params = {}
    for name, shape in expected.items():
        t = raw[name]
        if t.dtype != np.float32:
            die(f"{name}: dtype {t.dtype}, expected float32")
        if tuple(t.shape) != shape:
            die(f"{name}: shape {tuple(t.shape)}, expected {shape}")
        params[name] = t.astype(np.float64)
    if not mla and H % Hkv != 0:
        die(f"n_head {H} is not a multiple of n_kv_head {Hkv}")
    if not mla and d % 2 != 0:
        die(f"head_dim {d} is odd (RoPE needs pairs)")
    return cfg, params


# ---------------------------------------------------------------- model (float64)


def rmsnorm(x):
    """Parameter-free RMSNorm over the last axis: x / sqrt(mean(x²) + 1e-6)."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + RMS_EPS)


def silu(u):
    # u·σ(u), written with tanh so no exp overflows: σ(u) = (1 + tanh(u/2)) / 2.
    return u * 0.5 * (1.0 + np.tanh(0.5 * u))


def rope_tables(T, d, theta):
    """cos/sin [T, d/2]: angles in f64, then cos/sin rounded to f32 (docs/model.md)."""
    i = np.arange(d // 2, dtype=np.float64)
    inv_freq = theta ** (-2.0 * i / d)
    ang = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos = np.cos(ang).astype(np.float32).astype(np.float64)
    sin = np.sin(ang).astype(np.float32).astype(np.float64)
    return cos, sin


def rope(x, cos, sin):
    """NeoX half-split RoPE on x [B, T, nh, d], position = index along T."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    return np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)


def layernorm(x, weight, bias, eps):
    """LayerNorm over the last axis: (x − mean) / sqrt(var + eps) · weight + bias (biased var)."""
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * weight + bias


def allowed(T, kind, W, G):
    """A(t) as a [T, T] boolean matrix (row t, column s), per docs/model.md."""
    t = np.arange(T)[:, None]
    s = np.arange(T)[None, :]
    causal = s <= t
    if kind == "D":
        return causal
    if kind == "W":
        return causal & ((s > t - W) | (s < G))
    die(f"unknown attention kind {kind!r} in attn_pattern")


def attention(q, k, v, mask):
    """GQA softmax attention over the allowed keys, scale 1/sqrt(d) with d the query/key width.
    q [B,T,H,d], k [B,T,Hkv,d], v [B,T,Hkv,dv] -> [B,T,H,dv] (MLA: Hkv = H, dv may differ from d)."""
    B, T, H, d = q.shape
    group = H // k.shape[2]
    # query head j uses kv head j // group
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
    mask = mask[:, None] if mask.ndim == 3 else mask[None, None]  # per-batch DSA sets, or shared
    scores = np.where(mask, scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("bhts,bshe->bthe", p, v)


def partial_rope(x, r, theta):
    """V3.2's index RoPE on x [B, T, nh, d]: the NeoX rotation (table of width r) on the first r
    values of each head, the other d − r unchanged."""
    cos, sin = rope_tables(x.shape[1], r, theta)
    return np.concatenate([rope(x[..., :r], cos, sin), x[..., r:]], axis=-1)


def indexer_qkw(cfg, P, p, h, q_latent):
    """The lightning indexer's queries [B,T,H_I,d_I], key [B,T,d_I] and head weights [B,T,H_I].

    "gqa": both from the block input h, rotated over all d_I values, no key norm.
    "v32" (DeepSeek-V3.2): the query from the query latent (h when there is none), a LayerNorm
    on the key, RoPE on the first index_rope_dim values of each only."""
    B, T, _ = h.shape
    HI, dI = cfg["index_n_heads"], cfg["index_head_dim"]
    theta = float(cfg["rope_theta"])
    if cfg["indexer"] == "v32":
        r = cfg["index_rope_dim"]
        if q_latent is not None:
            qi = q_latent @ P[p + "attn.indexer.wq_b.weight"].T
        else:
            qi = h @ P[p + "attn.indexer.wq.weight"].T
        qi = partial_rope(qi.reshape(B, T, HI, dI), r, theta)
        ki = layernorm(
            h @ P[p + "attn.indexer.wk.weight"].T,
            P[p + "attn.indexer.k_norm.weight"],
            P[p + "attn.indexer.k_norm.bias"],
            LAYERNORM_EPS,
        )
        ki = partial_rope(ki.reshape(B, T, 1, dI), r, theta)[:, :, 0]
    else:
        cos, sin = rope_tables(T, dI, theta)
        qi = rope((h @ P[p + "attn.indexer.wq.weight"].T).reshape(B, T, HI, dI), cos, sin)
        ki = rope((h @ P[p + "attn.indexer.wk.weight"].T).reshape(B, T, 1, dI), cos, sin)[:, :, 0]
    wi = (h @ P[p + "attn.indexer.w_heads.weight"].T) / np.sqrt(HI * dI)  # [B, T, HI]
    return qi, ki, wi


def dsa_allowed(cfg, P, p, h, q_latent):
    """DSA key sets [B, T, T] of one layer from its lightning indexer on h [B, T, C] (and the
    normalized query latent [B, T, r_q] of an MLA layer that has one, else None)."""
    B, T, _ = h.shape
    qi, ki, wi = indexer_qkw(cfg, P, p, h, q_latent)
    x = np.einsum("btjd,bsd->btjs", qi, ki)
    I = np.einsum("btj,btjs->bts", wi, np.maximum(x, 0.0))
    K, W = cfg["index_topk"], cfg["index_local_window"]
    mask = np.zeros((B, T, T), dtype=bool)
    for b in range(B):
        for t in range(T):
            old = max(t + 1 - W, 0)  # keys s >= old form the local window
            mask[b, t, old : t + 1] = True
            if old > 0:
                # top-K of s < old by (score desc, then the more recent key)
                order = sorted(range(old), key=lambda s: (-I[b, t, s], -s))[:K]
                mask[b, t, order] = True
    return mask


def is_moe_layer(cfg, l):
    moe = cfg["moe"]
    return moe.get("n_routed_experts", 0) > 0 and l >= moe["first_k_dense"]


def swiglu_ffn(h, w_gate, w_up, w_down):
    return (silu(h @ w_gate.T) * (h @ w_up.T)) @ w_down.T


def moe_ffn(cfg, P, p, h):
    """DeepSeekMoE FFN on h [N, C] (the N tokens of one forward call, in order)."""
    m = cfg["moe"]
    E, K = m["n_routed_experts"], m["top_k"]
    logits = h @ P[p + "mlp.router.weight"].T  # [N, E]
    if m["score_func"] == "softmax":
        z = np.exp(logits - logits.max(axis=-1, keepdims=True))
        s = z / z.sum(axis=-1, keepdims=True)
    else:
        s = 1.0 / (1.0 + np.exp(-logits))
    key = s + P[p + "mlp.router.bias"]
    N = h.shape[0]
    allowed_e = np.ones((N, E), dtype=bool)
    G = m["n_group"]
    if G > 1:
        per = E // G
        kg = key.reshape(N, G, per)
        top2 = -np.sort(-kg, axis=-1)[..., : min(2, per)].sum(axis=-1)  # [N, G]
        # best topk_group groups, ties to the lower group index (stable sort of −score)
        keep = np.argsort(-top2, axis=-1, kind="stable")[:, : m["topk_group"]]
        mask = np.zeros((N, G), dtype=bool)
        np.put_along_axis(mask, keep, True, axis=-1)
        allowed_e = np.repeat(mask, per, axis=-1)
    masked = np.where(allowed_e, key, -np.inf)
    chosen = np.argsort(-masked, axis=-1, kind="stable")[:, :K]  # descending key, ties to lower index
    sc = np.take_along_axis(s, chosen, axis=-1)
    gates = sc / sc.sum(axis=-1, keepdims=True) * m["routed_scaling_factor"]
    cf = m["expert_capacity_factor"]
    if cf is not None:
        cap = int(np.ceil(cf * N * K / E))
        used = np.zeros(E, dtype=int)
        for t in range(N):  # admitted in token order, slot order
            for j in range(K):
                e = chosen[t, j]
                if used[e] >= cap:
                    gates[t, j] = 0.0
                else:
                    used[e] += 1
    y = np.zeros_like(h)
    wg, wu, wd = (P[p + f"mlp.experts.{n}.weight"] for n in ("w_gate", "w_up", "w_down"))
    for e in range(E):
        rows, slots = np.nonzero(chosen == e)
        if len(rows):
            y[rows] += gates[rows, slots][:, None] * swiglu_ffn(h[rows], wg[e], wu[e], wd[e])
    if m["n_shared_experts"] > 0:
        y += swiglu_ffn(h, *(P[p + f"mlp.shared.{n}.weight"] for n in ("w_gate", "w_up", "w_down")))
    return y


def gqa_qkv(cfg, P, p, h):
    """Grouped-query projection: q [B,T,H,d], k, v [B,T,Hkv,d], QK-norm and RoPE applied."""
    B, T, _ = h.shape
    H, Hkv, d = cfg["n_head"], cfg["n_kv_head"], cfg["head_dim"]
    cos, sin = rope_tables(T, d, float(cfg["rope_theta"]))
    q = (h @ P[p + "attn.c_q.weight"].T).reshape(B, T, H, d)
    k = (h @ P[p + "attn.c_k.weight"].T).reshape(B, T, Hkv, d)
    v = (h @ P[p + "attn.c_v.weight"].T).reshape(B, T, Hkv, d)
    return rope(rmsnorm(q), cos, sin), rope(rmsnorm(k), cos, sin), v, None


def mla_qkv(cfg, P, p, h):
    """Multi-head Latent Attention (docs/model.md): q, k [B,T,H,d_n+d_r], v [B,T,H,d_v] and the
    normalized query latent [B,T,r_q] (None when q_lora_rank = 0)."""
    B, T, _ = h.shape
    H = cfg["n_head"]
    dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    rkv = cfg["kv_lora_rank"]
    cos, sin = rope_tables(T, dr, float(cfg["rope_theta"]))
    if cfg["q_lora_rank"] > 0:
        q_latent = rmsnorm(h @ P[p + "attn.wq_a.weight"].T)
        q = q_latent @ P[p + "attn.wq_b.weight"].T
    else:
        q_latent = None
        q = h @ P[p + "attn.wq.weight"].T
    q = q.reshape(B, T, H, dn + dr)
    q = np.concatenate([q[..., :dn], rope(q[..., dn:], cos, sin)], axis=-1)
    kv_a = h @ P[p + "attn.wkv_a.weight"].T  # [B, T, r_kv + d_r]
    c_kv = rmsnorm(kv_a[..., :rkv])
    k_pe = rope(kv_a[..., None, rkv:], cos, sin)  # [B, T, 1, d_r]: one rotary key for all heads
    kv = (c_kv @ P[p + "attn.wkv_b.weight"].T).reshape(B, T, H, dn + dv)
    k = np.concatenate([kv[..., :dn], np.broadcast_to(k_pe, (B, T, H, dr))], axis=-1)
    return q, k, kv[..., dn:], q_latent


def forward_logits(cfg, P, ids):
    """Capped logits ẑ [B, T, V] for ids [B, T]."""
    B, T = ids.shape
    qkv = mla_qkv if cfg["attention"] == "mla" else gqa_qkv
    x = rmsnorm(P["wte.weight"][ids])
    for l in range(cfg["n_layer"]):
        p = f"blocks.{l}."
        h = rmsnorm(x)
        q, k, v, q_latent = qkv(cfg, P, p, h)
        pattern = cfg["attn_pattern"]
        kind = pattern[l % len(pattern)]
        if kind == "S":
            mask = dsa_allowed(cfg, P, p, h, q_latent)
        else:
            mask = allowed(T, kind, cfg["dsa_window_size"], cfg["n_global"])
        o = attention(q, k, v, mask)
        x = x + o.reshape(B, T, -1) @ P[p + "attn.c_proj.weight"].T
        h = rmsnorm(x)
        if is_moe_layer(cfg, l):
            x = x + moe_ffn(cfg, P, p, h.reshape(B * T, -1)).reshape(B, T, -1)
        else:
            x = x + swiglu_ffn(h, *(P[p + f"mlp.{n}.weight"] for n in ("w_gate", "w_up", "w_down")))
    z = rmsnorm(x) @ P["lm_head.weight"].T
    cap = float(cfg["logit_softcap"])
    if cap > 0:
        z = cap * np.tanh(z / cap)
    return z


def token_losses(cfg, P, ids, targets):
    """Per-position cross-entropy [B, T] (positions with target < 0 -> NaN)."""
    z = forward_logits(cfg, P, ids)
    m = z.max(axis=-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(z - m).sum(axis=-1))
    valid = targets >= 0
    picked = np.take_along_axis(z, np.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return np.where(valid, lse - picked, np.nan)


# ---------------------------------------------------------------- eval


def evaluate(cfg, P, tokens, eval_tokens, batch):
    """Mean loss over sequential windows, grouped as `nanoseek eval` does."""
    T = cfg["max_seq_len"]
    V = cfg["vocab_size"]
    if tokens.size and int(tokens.max()) >= V:
        die(f"shard holds id {int(tokens.max())} >= model vocab {V}")
    n_windows = (tokens.size - 1) // T if tokens.size > 0 else 0  # i·T+T+1 ≤ n
    n_groups = n_windows // batch
    if n_groups == 0:
        die(f"shard too short: {tokens.size} tokens, need {batch * T + 1} for one batch")
    total, count = 0.0, 0
    for g in range(n_groups):
        w0 = g * batch
        starts = (w0 + np.arange(batch)) * T
        idx = starts[:, None] + np.arange(T)[None, :]
        ids, targets = tokens[idx], tokens[idx + 1]
        losses = token_losses(cfg, P, ids, targets)
        valid = targets >= 0
        total += float(losses[valid].sum())
        count += int(valid.sum())
        if count >= eval_tokens:
            break
    return total / count, count


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", nargs="?", help="checkpoint directory (holds model.safetensors)")
    ap.add_argument("shard", nargs="?", help="nanoseek token shard")
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--write-shard", metavar="OUT", help="write a synthetic test shard instead")
    ap.add_argument("--vocab", type=int, help="vocab size in the written shard's header")
    ap.add_argument("--max-id", type=int, help="written ids are < this (default: --vocab)")
    ap.add_argument("--n", type=int, help="tokens to write")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    if a.write_shard:
        if a.vocab is None or a.n is None:
            ap.error("--write-shard needs --vocab and --n")
        max_id = a.max_id if a.max_id is not None else a.vocab
        if not 0 < max_id <= a.vocab:
            ap.error("--max-id must be in 1..=--vocab")
        write_shard(a.write_shard, markov_tokens(a.n, max_id, a.seed), a.vocab)
        return 0

    if a.ckpt is None or a.shard is None:
        ap.error("need CKPT_DIR and SHARD (or --write-shard)")
    if a.batch_size < 1 or a.eval_tokens < 1:
        ap.error("--batch-size and --eval-tokens must be positive")
    cfg, P = load_checkpoint(a.ckpt)
    tokens, _ = read_shard(a.shard)
    loss, count = evaluate(cfg, P, tokens, a.eval_tokens, a.batch_size)
    print(json.dumps({"loss": loss, "tokens": count}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
