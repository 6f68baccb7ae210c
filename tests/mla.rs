//! Multi-head Latent Attention in the model (`nn::mla`): finite differences through whole MLA
//! models (D, W, S layers, with and without MoE, with and without a query latent), agreement with
//! a plain multi-head model and with an independent f64 implementation of the MLA equations, the
//! parameter names and counts. Cached decoding on the latent cache is `tests/mla_decode.rs`.

mod common;

use nanoseek::autograd::Tape;
use nanoseek::nn::{Model, ModelConfig, MoeConfig};
use nanoseek::rng::Rng;

/// Two layers, 2 heads of d_n 4 + d_r 4 (d_qk 8) and values d_v 6, a latent of rank 8, C = 16.
fn small_mla(pattern: &str, q_lora_rank: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: 17,
        n_layer: 2,
        n_embd: 16,
        n_head: 2,
        n_kv_head: 2,
        head_dim: 8,
        ffn_hidden: 24,
        max_seq_len: 8,
        attn_pattern: pattern.into(),
        dsa_window_size: 3,
        n_global: 1,
        index_n_heads: 2,
        index_head_dim: 4,
        index_topk: 2,
        index_local_window: 1,
        attention: "mla".into(),
        q_lora_rank,
        kv_lora_rank: 8,
        qk_nope_head_dim: 4,
        qk_rope_head_dim: 4,
        v_head_dim: 6,
        ..ModelConfig::preset("tiny").unwrap()
    }
}

fn batch(vocab: usize, n: usize, seed: u64) -> (Vec<u32>, Vec<i32>) {
    let mut r = Rng::new(seed);
    let ids: Vec<u32> = (0..n).map(|_| r.below(vocab) as u32).collect();
    let targets: Vec<i32> = (0..n).map(|_| r.below(vocab) as i32).collect();
    (ids, targets)
}

fn randomized(cfg: &ModelConfig, seed: u64) -> Model {
    let mut model = Model::new(cfg, 1).unwrap();
    let mut r = Rng::new(seed);
    for p in &mut model.params {
        p.tensor.data.iter_mut().for_each(|x| *x = r.normal() as f32 * 0.5);
    }
    model
}

/// (cross-entropy, Σ aux losses) of one training forward on a [2, 8] batch.
fn losses(model: &Model, ids: &[u32], targets: &[i32]) -> (f64, f64) {
    let mut tape = Tape::new(model.cpu());
    let pv = model.params_on(&mut tape);
    let l = model.loss(&mut tape, &pv, ids, targets, 2, 8).unwrap();
    (tape.value(l)[0] as f64, tape.aux_loss_total())
}

/// Finite differences of `objective` against the analytic gradient of CE + aux losses, 8
/// coordinates of every parameter but those `skip` names.
fn check_model(name: &str, mut model: Model, objective: &dyn Fn(&Model) -> f64, skip: &dyn Fn(&str) -> bool) {
    let (ids, targets) = batch(model.config.vocab_size, 16, 3);
    let grads: Vec<Option<Vec<f32>>> = {
        let mut tape = Tape::new(model.cpu());
        let pv = model.params_on(&mut tape);
        let l = model.loss(&mut tape, &pv, &ids, &targets, 2, 8).unwrap();
        tape.backward(l, 1.0).unwrap();
        pv.iter().map(|&v| tape.grad(v).map(<[f32]>::to_vec)).collect()
    };
    let of = |m: &Model| objective(m);
    let mut r = Rng::new(4);
    let mut worst = 0.0f64;
    for (pi, grad) in grads.iter().enumerate() {
        let pname = model.params[pi].name.clone();
        if skip(&pname) {
            continue;
        }
        let g = grad.clone().unwrap_or_else(|| panic!("{name}: {pname} gets no gradient"));
        for _ in 0..8 {
            let j = r.below(g.len());
            let orig = model.params[pi].tensor.data[j];
            model.params[pi].tensor.data[j] = orig + common::EPS;
            let lp = of(&model);
            model.params[pi].tensor.data[j] = orig - common::EPS;
            let lm = of(&model);
            model.params[pi].tensor.data[j] = orig;
            let (fd, an) = ((lp - lm) / (2.0 * common::EPS as f64), g[j] as f64);
            let bound = common::RTOL * an.abs().max(fd.abs()) + common::ATOL;
            assert!((an - fd).abs() <= bound, "{name}: {pname} [{j}]: analytic {an:.6} vs fd {fd:.6}");
            worst = worst.max((an - fd).abs() / bound);
        }
    }
    println!("{name}: gradients match finite differences (worst error / bound = {worst:.3})");
}

/// Dense and window layers, with a direct query projection and with a query latent: every
/// parameter, objective = cross-entropy (no aux losses in a dense-FFN model without DSA).
#[test]
fn mla_dense_and_window_gradients_match_finite_differences() {
    let (ids, targets) = batch(17, 16, 3);
    for (pattern, rq) in [("DW", 0), ("WD", 6)] {
        let model = randomized(&small_mla(pattern, rq), 2);
        check_model(&format!("MLA {pattern} q_lora_rank {rq}"), model, &|m| losses(m, &ids, &targets).0, &|_| false);
    }
}

/// A MoE model (the second FFN routed, the bias pinning the selection as in tests/moe_model.rs):
/// objective = cross-entropy + the balance loss.
#[test]
fn mla_moe_gradients_match_finite_differences() {
    let (ids, targets) = batch(17, 16, 3);
    for rq in [0, 6] {
        let moe =
            MoeConfig { n_routed_experts: 4, top_k: 2, moe_inter_dim: 8, seq_aux_alpha: 0.1, ..MoeConfig::default() };
        let cfg = ModelConfig { moe, ..small_mla("DW", rq) };
        let mut model = randomized(&cfg, 5);
        model.moe_bias[1] = vec![20.0, 10.0, -10.0, -20.0];
        let obj = |m: &Model| {
            let (ce, aux) = losses(m, &ids, &targets);
            ce + aux
        };
        check_model(&format!("MLA + MoE q_lora_rank {rq}"), model, &obj, &|_| false);
    }
}

/// A DSA layer on MLA ("SD"): the existing indexer reads the detached block input, so the LM
/// loss's gradient reaches every parameter but the indexer's (whose KL gradient tests/dsa_model.rs
/// checks) and the selection stays fixed under perturbations of everything but wte (skipped).
#[test]
fn mla_sparse_gradients_match_finite_differences() {
    let (ids, targets) = batch(17, 16, 3);
    for rq in [0, 6] {
        let model = randomized(&small_mla("SD", rq), 6);
        let skip = |n: &str| n == "wte.weight" || n.contains("indexer");
        check_model(&format!("MLA DSA q_lora_rank {rq}"), model, &|m| losses(m, &ids, &targets).0, &skip);
    }
}

/// Parameter names and shapes in checkpoint order, and the counts `info` reports.
#[test]
fn mla_parameters_and_counts() {
    for rq in [0, 6] {
        let cfg = small_mla("SD", rq);
        let model = Model::new(&cfg, 1).unwrap();
        let names: Vec<&str> =
            model.params.iter().map(|p| p.name.as_str()).filter(|n| n.starts_with("blocks.0.attn.")).collect();
        let want: &[&str] = if rq > 0 {
            &["wq_a", "wq_b", "wkv_a", "wkv_b", "c_proj", "indexer.wq", "indexer.wk", "indexer.w_heads"]
        } else {
            &["wq", "wkv_a", "wkv_b", "c_proj", "indexer.wq", "indexer.wk", "indexer.w_heads"]
        };
        let want: Vec<String> = want.iter().map(|w| format!("blocks.0.attn.{w}.weight")).collect();
        assert_eq!(names, want);
        assert_eq!(model.num_params(), cfg.num_params(), "counts are exact");
        let shape = |n: &str| model.param(&format!("blocks.0.attn.{n}.weight")).unwrap().shape.clone();
        assert_eq!(shape("wkv_a"), [8 + 4, 16]);
        assert_eq!(shape("wkv_b"), [2 * (4 + 6), 8]);
        assert_eq!(shape("c_proj"), [16, 2 * 6]);
        assert!(model.param("blocks.0.attn.c_proj.weight").unwrap().data.iter().all(|&x| x == 0.0));
        let wkv_b = model.param("blocks.0.attn.wkv_b.weight").unwrap();
        let std = (wkv_b.data.iter().map(|x| x * x).sum::<f32>() / wkv_b.data.len() as f32).sqrt();
        assert!((std - 1.0 / 8f32.sqrt()).abs() < 0.1, "wkv_b ~ N(0, 1/r_kv), std {std}");
    }
}

fn rms_norm(x: &[f64]) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + 1e-6).sqrt();
    x.iter().map(|v| v * r).collect()
}

/// y = W x for W [out, in] (row-major f32).
fn matvec(w: &[f32], x: &[f64]) -> Vec<f64> {
    w.chunks_exact(x.len()).map(|row| row.iter().zip(x).map(|(&a, b)| a as f64 * b).sum()).collect()
}

/// NeoX half-split RoPE of one head at position `pos` (the engine's layout, θ = 10⁴).
fn rope(x: &[f64], pos: usize) -> Vec<f64> {
    let (d, half) = (x.len(), x.len() / 2);
    let mut y = x.to_vec();
    for i in 0..half {
        let a = pos as f64 * 10_000f64.powf(-2.0 * i as f64 / d as f64);
        y[i] = x[i] * a.cos() - x[i + half] * a.sin();
        y[i + half] = x[i] * a.sin() + x[i + half] * a.cos();
    }
    y
}

/// Causal attention of one sequence: per query row i, softmax over s ≤ i of q_i·k_s·scale, then Σ p v.
fn causal_attention(q: &[Vec<f64>], k: &[Vec<f64>], v: &[Vec<f64>], scale: f64) -> Vec<Vec<f64>> {
    (0..q.len())
        .map(|i| {
            let s: Vec<f64> =
                (0..=i).map(|j| q[i].iter().zip(&k[j]).map(|(a, b)| a * b).sum::<f64>() * scale).collect();
            let m = s.iter().cloned().fold(f64::MIN, f64::max);
            let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = p.iter().sum();
            (0..v[0].len()).map(|c| (0..=i).map(|j| p[j] / z * v[j][c]).sum()).collect()
        })
        .collect()
}

/// The engine's hidden rows of one sequence (after the only block).
fn engine_hidden(model: &Model, ids: &[u32]) -> Vec<f32> {
    let mut tape = Tape::inference(model.cpu());
    let pv = model.params_on(&mut tape);
    let h = model.hidden(&mut tape, &pv, ids, 1, ids.len()).unwrap();
    tape.value(h).to_vec()
}

/// A one-layer MLA model with random c_proj (w_down stays 0, so the FFN adds nothing) against a
/// straightforward f64 implementation of the MLA equations of docs/model.md, written here from
/// the equations (per token, per head, no tiling): query latent with its norm, the latent c_kv
/// with its norm, RoPE on q_pe per head and on the one shared k_pe, scale 1/sqrt(d_n + d_r),
/// values of width d_v, c_proj and the residual.
#[test]
fn mla_forward_equals_an_f64_implementation_of_the_equations() {
    for rq in [0, 6] {
        let cfg = ModelConfig { n_layer: 1, ..small_mla("D", rq) };
        let mut model = Model::new(&cfg, 3).unwrap();
        let mut r = Rng::new(9);
        let cp = model.params.iter_mut().find(|p| p.name == "blocks.0.attn.c_proj.weight").unwrap();
        cp.tensor.data.iter_mut().for_each(|x| *x = r.normal() as f32 * 0.3);
        let ids = [3u32, 7, 1, 12, 5, 5, 0];
        let got = engine_hidden(&model, &ids);
        let w = |n: &str| &model.param(&format!("blocks.0.attn.{n}.weight")).unwrap().data;
        let (h_n, dn, dr, dv, rkv, c) = (2, 4, 4, 6, 8, 16);
        let wte = &model.param("wte.weight").unwrap().data;
        let x0: Vec<Vec<f64>> = ids
            .iter()
            .map(|&id| rms_norm(&wte[id as usize * c..][..c].iter().map(|&v| v as f64).collect::<Vec<_>>()))
            .collect();
        let (mut q, mut k, mut v) = (vec![vec![]; h_n], vec![vec![]; h_n], vec![vec![]; h_n]);
        for (pos, x) in x0.iter().enumerate() {
            let h = rms_norm(x);
            let qa = if rq > 0 { matvec(w("wq_b"), &rms_norm(&matvec(w("wq_a"), &h))) } else { matvec(w("wq"), &h) };
            let kva = matvec(w("wkv_a"), &h);
            let k_pe = rope(&kva[rkv..], pos);
            let kv = matvec(w("wkv_b"), &rms_norm(&kva[..rkv]));
            for hh in 0..h_n {
                let qh = &qa[hh * (dn + dr)..][..dn + dr];
                q[hh].push([&qh[..dn], &rope(&qh[dn..], pos)[..]].concat());
                let kvh = &kv[hh * (dn + dv)..][..dn + dv];
                k[hh].push([&kvh[..dn], &k_pe[..]].concat());
                v[hh].push(kvh[dn..].to_vec());
            }
        }
        let scale = 1.0 / ((dn + dr) as f64).sqrt();
        let o: Vec<Vec<Vec<f64>>> = (0..h_n).map(|hh| causal_attention(&q[hh], &k[hh], &v[hh], scale)).collect();
        let mut worst = 0.0f64;
        for (pos, x) in x0.iter().enumerate() {
            let cat: Vec<f64> = (0..h_n).flat_map(|hh| o[hh][pos].clone()).collect();
            let y = matvec(w("c_proj"), &cat);
            for j in 0..c {
                let want = x[j] + y[j];
                let err = (got[pos * c + j] as f64 - want).abs();
                worst = worst.max(err);
                assert!(
                    err < 2e-5 * (1.0 + want.abs()),
                    "q_lora_rank {rq}, pos {pos}, col {j}: {} vs {want}",
                    got[pos * c + j]
                );
            }
        }
        println!("MLA (q_lora_rank {rq}) vs the f64 equations: max |error| {worst:.2e}");
    }
}

/// MLA reproduces a plain multi-head attention model (MHA: per head q = W_q h, k = W_k h, v = W_v h,
/// causal softmax with scale 1/sqrt(d_n), no positions, then c_proj and the residual), by this
/// construction: q_lora_rank 0; kv_lora_rank = C with wkv_a's latent rows the identity, so
/// c_kv = norm(h) = h (h is already RMS-normalized; a second norm changes it by O(eps) only);
/// wkv_b's rows the MHA's W_k and W_v per head (so k_nope = W_k h and v = W_v h); the rotary
/// rows of wq and wkv_a zero, so q_pe = k_pe = 0 and the rotary part adds nothing to the scores;
/// wq's rows the MHA's W_q times sqrt((d_n + d_r) / d_n), which turns MLA's scale
/// 1/sqrt(d_n + d_r) into the MHA's 1/sqrt(d_n). The MHA is computed in f64 from its own weights.
#[test]
fn mla_reproduces_a_plain_multi_head_model() {
    let (c, h_n, dn, dr, dv) = (16, 2, 4, 4, 6);
    let cfg = ModelConfig { n_layer: 1, kv_lora_rank: c, ..small_mla("D", 0) };
    let mut model = Model::new(&cfg, 4).unwrap();
    let mut r = Rng::new(11);
    let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| r.normal() as f32 * 0.4).collect() };
    let (wq, wk, wv, wo) = (rand(h_n * dn * c), rand(h_n * dn * c), rand(h_n * dv * c), rand(c * h_n * dv));
    let set = |m: &mut Model, n: &str, data: Vec<f32>| {
        let p = m.params.iter_mut().find(|p| p.name == format!("blocks.0.attn.{n}.weight")).unwrap();
        assert_eq!(p.tensor.data.len(), data.len(), "{n}");
        p.tensor.data = data;
    };
    let fold = ((dn + dr) as f32 / dn as f32).sqrt();
    let mut mla_wq = vec![0.0; h_n * (dn + dr) * c];
    let mut wkv_a = vec![0.0; (c + dr) * c];
    let mut wkv_b = vec![0.0; h_n * (dn + dv) * c];
    for hh in 0..h_n {
        for i in 0..dn {
            for j in 0..c {
                mla_wq[(hh * (dn + dr) + i) * c + j] = wq[(hh * dn + i) * c + j] * fold;
                wkv_b[(hh * (dn + dv) + i) * c + j] = wk[(hh * dn + i) * c + j];
            }
        }
        for i in 0..dv {
            wkv_b[(hh * (dn + dv) + dn + i) * c..][..c].copy_from_slice(&wv[(hh * dv + i) * c..][..c]);
        }
    }
    for i in 0..c {
        wkv_a[i * c + i] = 1.0;
    }
    set(&mut model, "wq", mla_wq);
    set(&mut model, "wkv_a", wkv_a);
    set(&mut model, "wkv_b", wkv_b);
    set(&mut model, "c_proj", wo.clone());
    let ids = [2u32, 9, 9, 4, 16, 0, 3, 8];
    let got = engine_hidden(&model, &ids);
    // the plain MHA in f64
    let wte = &model.param("wte.weight").unwrap().data;
    let x0: Vec<Vec<f64>> = ids
        .iter()
        .map(|&id| rms_norm(&wte[id as usize * c..][..c].iter().map(|&v| v as f64).collect::<Vec<_>>()))
        .collect();
    let hs: Vec<Vec<f64>> = x0.iter().map(|x| rms_norm(x)).collect();
    let head = |w: &[f32], hh: usize, d: usize| -> Vec<Vec<f64>> {
        hs.iter().map(|h| matvec(&w[hh * d * c..][..d * c], h)).collect()
    };
    let o: Vec<Vec<Vec<f64>>> = (0..h_n)
        .map(|hh| {
            causal_attention(&head(&wq, hh, dn), &head(&wk, hh, dn), &head(&wv, hh, dv), 1.0 / (dn as f64).sqrt())
        })
        .collect();
    let mut worst = 0.0f64;
    for (pos, x) in x0.iter().enumerate() {
        let cat: Vec<f64> = (0..h_n).flat_map(|hh| o[hh][pos].clone()).collect();
        let y = matvec(&wo, &cat);
        for j in 0..c {
            let want = x[j] + y[j];
            let err = (got[pos * c + j] as f64 - want).abs();
            worst = worst.max(err);
            assert!(err < 5e-5 * (1.0 + want.abs()), "pos {pos}, col {j}: MLA {} vs MHA {want}", got[pos * c + j]);
        }
    }
    println!("MLA under the MHA construction vs the f64 MHA: max |error| {worst:.2e}");
}

/// A small MLA model (dense, window and DSA layers, a query latent, MoE and one MTP module) trains
/// through the `train` API on the CPU: the loss falls, and a run resumed from its step-12
/// checkpoint continues bitwise (losses and final weights).
#[test]
fn mla_trains_and_resumes_bitwise() {
    use nanoseek::device::Device;
    use nanoseek::train::{self, RunConfig, TrainRequest, TrainSettings};
    let mut m = ModelConfig::preset("tiny").unwrap();
    (m.n_layer, m.n_embd, m.n_head, m.head_dim, m.ffn_hidden, m.max_seq_len) = (3, 32, 2, 16, 64, 16);
    (m.attn_pattern, m.dsa_window_size, m.n_global, m.index_topk, m.index_n_heads, m.index_head_dim) =
        ("DWS".into(), 4, 1, 4, 2, 8);
    (m.attention, m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) =
        ("mla".into(), 16, 24, 8, 8, 12);
    m.moe = MoeConfig { n_routed_experts: 4, top_k: 2, moe_inter_dim: 16, first_k_dense: 2, ..MoeConfig::default() };
    m.mtp_depth = 1;
    let request = |dir: &std::path::Path, resume: Option<u64>| {
        let mut t = TrainSettings::for_model(&m);
        (t.device_batch_size, t.total_batch_size, t.num_iterations) = (2, 2 * 16, 24);
        (t.save_every, t.eval_every, t.eval_batches, t.keep_checkpoints) = (12, 0, 1, 0);
        TrainRequest {
            run: RunConfig { model: m.clone(), train: t },
            run_dir: dir.to_path_buf(),
            resume_from_step: resume,
            device: Device::Cpu,
            verbose: false,
            sample_tokens: 0,
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let (full, part) = (tmp.path().join("full"), tmp.path().join("part"));
    let a = train::train(request(&full, None)).unwrap();
    let (first, last) = (a.losses[0].1, a.losses[23].1);
    println!("MLA training: loss {first:.3} → {last:.3}");
    assert!(last < first - 0.5, "the loss should fall: {first} → {last}");
    let (src, dst) = (train::checkpoint::checkpoint_dir(&full, 12), train::checkpoint::checkpoint_dir(&part, 12));
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["model.safetensors", "optim.safetensors", "state.json", "checksums.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let b = train::train(request(&part, Some(12))).unwrap();
    let bits = |l: &[(u64, f32)]| l.iter().map(|&(s, v)| (s, v.to_bits())).collect::<Vec<_>>();
    assert_eq!(bits(&a.losses[12..]), bits(&b.losses), "resume continues bitwise");
    let wa = std::fs::read(train::checkpoint::checkpoint_dir(&full, 24).join("model.safetensors")).unwrap();
    let wb = std::fs::read(train::checkpoint::checkpoint_dir(&part, 24).join("model.safetensors")).unwrap();
    assert!(wa == wb, "final weights are bitwise equal");
}

/// CUDA training takes MLA models whose head shape (d_qk, d_v) has attention kernels ((96, 64)
/// and (192, 128): head_dim 64 and 128 under the derived widths) and refuses the others before
/// any kernel runs, naming the shape and the supported set; the check needs no GPU.
#[test]
fn cuda_shape_check_takes_mla_kernel_shapes_only() {
    let err = nanoseek::backend::check_cuda_shapes(&small_mla("D", 0)).unwrap_err().to_string();
    assert!(err.contains("MLA") && err.contains("got (8, 6)") && err.contains("(96, 64)"), "{err}");
    assert!(nanoseek::backend::check_cuda_shapes(&ModelConfig::preset("tiny").unwrap()).is_ok());
    for preset in ["medium", "xlarge"] {
        let c = ModelConfig::preset(preset).unwrap();
        assert!(c.is_mla());
        nanoseek::backend::check_cuda_shapes(&c).unwrap();
    }
}

/// Config validation names the field; old configs (no MLA keys) load as GQA; derived widths.
#[test]
fn mla_config_validation_and_defaults() {
    let bad = |f: &dyn Fn(&mut ModelConfig)| {
        let mut c = small_mla("D", 0);
        f(&mut c);
        c.validate().unwrap_err().to_string()
    };
    assert!(bad(&|c| c.qk_rope_head_dim = 3).contains("qk_rope_head_dim"));
    assert!(bad(&|c| c.kv_lora_rank = 0).contains("kv_lora_rank"));
    assert!(bad(&|c| c.v_head_dim = 0).contains("v_head_dim"));
    assert!(bad(&|c| c.attention = "mqa".into()).contains("attention"));
    let json = serde_json::to_value(ModelConfig::preset("tiny").unwrap()).unwrap();
    let mut old = json.as_object().unwrap().clone();
    for k in ["attention", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"] {
        old.remove(k);
    }
    let c: ModelConfig = serde_json::from_value(serde_json::Value::Object(old)).unwrap();
    assert!(!c.is_mla());
    let mut c = ModelConfig::preset("tiny").unwrap();
    nanoseek::nn::ConfigOverrides { attention: Some("mla".into()), ..Default::default() }.apply(&mut c).unwrap();
    assert_eq!(
        (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank, c.q_lora_rank),
        (64, 32, 64, 256, 0)
    );
}
