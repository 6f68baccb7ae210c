//! Multi-head Latent Attention against grouped-query attention at equal active width, on the
//! CPU tape: the same n_embd, n_head, head width (GQA head_dim = MLA's d_n = d_v = 64, d_r = 32),
//! batch and sequence length; MLA with the presets' proportions (r_kv = 4·64, r_q =
//! `default_q_lora_rank(n_embd)`). What is timed is forward + backward of a one-layer model's
//! hidden state (`Model::hidden` then `Tape::backward_from`): the embedding lookup and its norm,
//! the attention sublayer (norm, projections, latent norms, RoPE, dense causal attention, output
//! projection) and a 64-wide SwiGLU FFN, identical in both, so the attention sublayer is nearly
//! all of it (the summary prints the FFN's share of the GQA model's matmul FLOPs). GQA is
//! multi-head here (n_kv_head = n_head, as in the tiny and small presets).
//!
//! Then the KV-cache bytes per token of both, per layer and for the MLA presets.
//!
//! `cargo bench --bench mla_attention`

use criterion::{BenchmarkId, Criterion};
use nanoseek::autograd::Tape;
use nanoseek::nn::config::default_q_lora_rank;
use nanoseek::nn::decode::kv_bytes_per_layer;
use nanoseek::nn::{ConfigOverrides, Model, ModelConfig};
use nanoseek::rng::Rng;
use std::time::Instant;

/// FFN width of the timed layer: as narrow as the config allows to keep, so the attention dominates.
const FFN: usize = 64;
const VOCAB: usize = 256;
/// Timings per configuration in the summary.
const REPS: usize = 15;

/// A named shape: preset whose width it takes, batch, sequence length.
const SHAPES: [(&str, usize, usize); 2] = [("tiny", 8, 256), ("small", 1, 1024)];

/// One-layer dense-attention config of `preset`'s width, GQA or MLA (the presets' MLA rule).
fn config(preset: &str, t: usize, mla: bool) -> ModelConfig {
    let mut c = ModelConfig::preset(preset).unwrap();
    let width = c.n_embd;
    let o = ConfigOverrides {
        vocab_size: Some(VOCAB),
        n_layer: Some(1),
        ffn_hidden: Some(FFN),
        max_seq_len: Some(t),
        attn_pattern: Some("D".into()),
        attention: mla.then(|| "mla".to_string()),
        q_lora_rank: mla.then(|| default_q_lora_rank(width)),
        ..Default::default()
    };
    o.apply(&mut c).unwrap();
    c
}

struct Case {
    model: Model,
    ids: Vec<u32>,
    seed: Vec<f32>,
    b: usize,
    t: usize,
}

impl Case {
    fn new(c: &ModelConfig, b: usize, t: usize) -> Case {
        let mut r = Rng::new(7);
        let ids = (0..b * t).map(|_| r.below(VOCAB) as u32).collect();
        let seed = (0..b * t * c.n_embd).map(|_| r.normal() as f32).collect();
        Case { model: Model::new(c, 1).unwrap(), ids, seed, b, t }
    }

    /// Forward and backward of the layer's output on a fresh tape.
    fn step(&self) {
        let mut tape = Tape::new(self.model.cpu());
        let pv = self.model.params_on(&mut tape);
        let x = self.model.hidden(&mut tape, &pv, &self.ids, self.b, self.t).unwrap();
        tape.backward_from(x, self.seed.clone()).unwrap();
    }
}

/// Best of `reps` timings of `f` and of `g`, taken alternately (so that a busy machine slows
/// both alike), in ms.
fn best_ms_interleaved(reps: usize, f: impl Fn(), g: impl Fn()) -> (f64, f64) {
    let ms = |h: &dyn Fn()| {
        let t = Instant::now();
        h();
        t.elapsed().as_secs_f64() * 1e3
    };
    f(); // warm-up
    g();
    (0..reps).fold((f64::INFINITY, f64::INFINITY), |(bf, bg), _| (bf.min(ms(&f)), bg.min(ms(&g))))
}

fn dims(c: &ModelConfig) -> String {
    if c.is_mla() {
        format!(
            "MLA C={} H={} d_n={} d_r={} d_v={} r_q={} r_kv={}",
            c.n_embd, c.n_head, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.q_lora_rank, c.kv_lora_rank
        )
    } else {
        format!("GQA C={} H={} Hkv={} d={}", c.n_embd, c.n_head, c.n_kv_head, c.head_dim)
    }
}

fn main() {
    let mut crit = Criterion::default().configure_from_args().sample_size(10);
    let mut g = crit.benchmark_group("attention_sublayer_fwd_bwd");
    for (preset, b, t) in SHAPES {
        for mla in [false, true] {
            let case = Case::new(&config(preset, t, mla), b, t);
            let name = format!("{}_{preset}_width", if mla { "mla" } else { "gqa" });
            g.bench_with_input(BenchmarkId::new(name, format!("{b}x{t}")), &(), |bn, _| bn.iter(|| case.step()));
        }
    }
    g.finish();

    println!("\nsummary (best of {REPS}, taken alternately, forward + backward of a one-layer model's hidden state, dense causal):");
    println!(
        "{:>6} {:>9} {:>10} {:>10} {:>8} {:>10}  shapes",
        "shape", "b x T", "GQA ms", "MLA ms", "MLA/GQA", "FFN share"
    );
    for (preset, b, t) in SHAPES {
        let (cg, cm) = (config(preset, t, false), config(preset, t, true));
        let (gqa, mla) = (Case::new(&cg, b, t), Case::new(&cm, b, t));
        let (tg, tm) = best_ms_interleaved(REPS, || gqa.step(), || mla.step());
        let (a, f) = cg.block_params();
        println!(
            "{preset:>6} {:>9} {tg:>10.1} {tm:>10.1} {:>7.2}x {:>9.1}%  {}; {}",
            format!("{b}x{t}"),
            tm / tg,
            100.0 * f as f64 / (a + f) as f64,
            dims(&cg),
            dims(&cm)
        );
    }

    println!("\nKV-cache bytes per token and dense layer (f32, nn::decode::kv_bytes_per_layer): GQA 2·Hkv·d·4,");
    println!("MLA's latent cache (r_kv + d_r)·4; 'MLA as K/V' = the per-head keys and values it expands to, H·(d_qk + d_v)·4.");
    println!("{:>8} {:>12} {:>12} {:>12} {:>9}", "config", "GQA B/layer", "MLA B/layer", "MLA as K/V", "GQA/MLA");
    let mut rows: Vec<(String, ModelConfig, ModelConfig)> =
        SHAPES.iter().map(|&(p, _, t)| (format!("{p}-w"), config(p, t, false), config(p, t, true))).collect();
    for p in ["medium", "large", "xlarge", "full"] {
        let cm = ModelConfig::preset(p).unwrap();
        // the same preset with GQA (one K/V head per query head, head_dim as the preset has it)
        let cg = ModelConfig { attention: "gqa".into(), ..cm.clone() };
        rows.push((p.to_string(), cg, cm));
    }
    for (name, cg, cm) in rows {
        let gqa = kv_bytes_per_layer(&ModelConfig { attn_pattern: "D".into(), ..cg }, 0, 1);
        let mla = kv_bytes_per_layer(&ModelConfig { attn_pattern: "D".into(), ..cm.clone() }, 0, 1);
        let (_, dqk, dv) = cm.attn_heads();
        println!("{name:>8} {gqa:>12} {mla:>12} {:>12} {:>8.1}x", cm.n_head * (dqk + dv) * 4, gqa as f64 / mla as f64);
    }
    crit.final_summary();
}
