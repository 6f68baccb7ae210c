//! The ZeRO-1 step (`train::zero`) without MPI: ranks as threads of this test, joined by an
//! in-process [`Collectives`] (shared slots and a barrier; sums in rank order, as the MPI one).
//! World 2 and 3 with one micro-batch per rank give, bit for bit, one trainer's steps with 2 and
//! 3 micro-batches: every loss and gradient norm, the MoE loads and the indexer KL, the trained
//! weights and the optimizer state gathered to rank 0; and each rank keeps only its share of the
//! optimizer state. (`scripts/check-data-parallel.sh` runs the same under mpirun.)

use nanoseek::backend::StateBuf;
use nanoseek::data::Batch;
use nanoseek::dist::{sum_in_rank_order, Collectives};
use nanoseek::nn::{Model, ModelConfig};
use nanoseek::optim::{OptimConfig, Optimizer};
use nanoseek::rng::Rng;
use nanoseek::train::Trainer;
use std::collections::HashMap;
use std::sync::{Arc, Barrier, Condvar, Mutex};

/// (from, to) → messages of `send_to`, oldest first.
type Mailboxes = HashMap<(usize, usize), Vec<Vec<f32>>>;

/// What one rank ends with: its figures, weights, (rank 0) the whole optimizer state, and the
/// state floats it keeps.
type RankResult = (Figures, Vec<Vec<f32>>, Vec<Vec<f32>>, usize);

struct Shared {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f32>>>,
    slots64: Mutex<Vec<Vec<f64>>>,
    mail: Mutex<Mailboxes>,
    posted: Condvar,
}

struct ThreadComm {
    rank: usize,
    world: usize,
    sh: Arc<Shared>,
}

impl Collectives<Vec<f32>> for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn name(&self) -> &'static str {
        "threads"
    }
    fn reduce_to(&self, buf: &mut Vec<f32>, root: usize) -> anyhow::Result<()> {
        self.sh.slots.lock().unwrap()[self.rank] = buf.clone();
        self.sh.barrier.wait();
        if self.rank == root {
            let slots = self.sh.slots.lock().unwrap();
            let parts: Vec<&[f32]> = slots.iter().map(|v| v.as_slice()).collect();
            sum_in_rank_order(buf, &parts);
        }
        self.sh.barrier.wait();
        Ok(())
    }
    fn broadcast(&self, buf: &mut Vec<f32>, root: usize) -> anyhow::Result<()> {
        if self.rank == root {
            self.sh.slots.lock().unwrap()[root] = buf.clone();
        }
        self.sh.barrier.wait();
        if self.rank != root {
            buf.copy_from_slice(&self.sh.slots.lock().unwrap()[root]);
        }
        self.sh.barrier.wait();
        Ok(())
    }
    fn send_to(&self, buf: &mut Vec<f32>, from: usize, to: usize) -> anyhow::Result<()> {
        if self.rank == from && from != to {
            self.sh.mail.lock().unwrap().entry((from, to)).or_default().push(buf.clone());
            self.sh.posted.notify_all();
        } else if self.rank == to && from != to {
            let mut mail = self.sh.mail.lock().unwrap();
            loop {
                if let Some(m) = mail.get_mut(&(from, to)).filter(|q| !q.is_empty()) {
                    buf.copy_from_slice(&m.remove(0));
                    break;
                }
                mail = self.sh.posted.wait(mail).unwrap();
            }
        }
        Ok(())
    }
    fn all_gather_f64(&self, local: &[f64]) -> anyhow::Result<Vec<f64>> {
        self.sh.slots64.lock().unwrap()[self.rank] = local.to_vec();
        self.sh.barrier.wait();
        let all = self.sh.slots64.lock().unwrap().concat();
        self.sh.barrier.wait();
        Ok(all)
    }
    fn take_comm_seconds(&self) -> f64 {
        0.0
    }
}

fn config() -> ModelConfig {
    let mut c = ModelConfig::preset("tiny").unwrap();
    (c.vocab_size, c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim) = (96, 3, 64, 4, 2, 16);
    (c.ffn_hidden, c.max_seq_len, c.logit_softcap) = (160, 16, 15.0);
    c.attn_pattern = "WSD".into();
    (c.dsa_window_size, c.n_global) = (4, 1);
    (c.index_n_heads, c.index_head_dim, c.index_topk, c.index_local_window) = (2, 8, 4, 2);
    (c.moe.n_routed_experts, c.moe.top_k, c.moe.n_shared_experts, c.moe.moe_inter_dim) = (4, 2, 1, 32);
    (c.moe.first_k_dense, c.moe.seq_aux_alpha) = (1, 1e-2);
    c
}

/// Micro-batch `i` of the whole job (2 sequences).
fn batch(c: &ModelConfig, i: u64) -> Batch {
    let mut rng = Rng::new(1000 + i);
    let n = 2 * c.max_seq_len;
    let ids = (0..n).map(|_| rng.below(c.vocab_size) as u32).collect();
    let targets = (0..n).map(|k| if k % 11 == 3 { -1 } else { rng.below(c.vocab_size) as i32 }).collect();
    Batch { ids, targets }
}

/// Per step: (loss, grad norm, indexer KL, MoE counts per layer) as bits and integers.
type Figures = Vec<(u32, u32, Option<u32>, Vec<Option<Vec<usize>>>)>;

/// `steps` steps of `per_rank` micro-batches on rank `rank` of `world` (`comm` None: one process);
/// returns the figures, the weights and (rank 0) the whole optimizer state, and the state floats
/// this rank keeps.
fn run(world: usize, rank: usize, per_rank: usize, comm: Option<Box<dyn Collectives<Vec<f32>>>>) -> RankResult {
    let c = config();
    let mut m = Model::new(&c, 7).unwrap();
    let mut opt = Optimizer::new(&m, OptimConfig::default());
    let mut tr = Trainer::new_sharded(m.cpu().clone(), &mut m, &mut opt, comm).unwrap();
    let kept = tr
        .state
        .iter()
        .map(|s| match s {
            StateBuf::AdamW { m, v } => m.len() + v.len(),
            StateBuf::Muon { momentum } => momentum.len(),
        })
        .sum();
    let mut figures = Vec::new();
    for step in 0..3u64 {
        let mut micro = 0u64;
        let next = || {
            // rank r's micro-batch m is the job's micro-batch m·world + r
            let i = step * (per_rank * world) as u64 + micro * world as u64 + rank as u64;
            micro += 1;
            batch(&c, i)
        };
        let st = tr.train_step(&mut m, next, (per_rank, 1.0, 1.0), false).unwrap();
        let loads = st.moe_loads.iter().map(|l| l.as_ref().map(|l| l.counts.clone())).collect();
        figures.push((st.loss.to_bits(), st.grad_norm.to_bits(), st.indexer_loss.map(f32::to_bits), loads));
    }
    tr.copy_to_host(&mut m, &mut opt).unwrap();
    let weights = m.params.iter().map(|p| p.tensor.data.clone()).collect();
    let state = opt.state_tensors(&m).into_iter().map(|(_, t)| t.data).collect();
    (figures, weights, state, kept)
}

fn job(world: usize) -> Vec<RankResult> {
    let sh = Arc::new(Shared {
        barrier: Barrier::new(world),
        slots: Mutex::new(vec![Vec::new(); world]),
        slots64: Mutex::new(vec![Vec::new(); world]),
        mail: Mutex::new(HashMap::new()),
        posted: Condvar::new(),
    });
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let sh = sh.clone();
            std::thread::spawn(move || run(world, rank, 1, Some(Box::new(ThreadComm { rank, world, sh }))))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter().map(|t| t.iter().map(|x| x.to_bits()).collect()).collect()
}

#[test]
fn ranks_give_one_process_results_bit_for_bit() {
    for world in [2, 3] {
        let (figures, weights, state, all_state) = run(1, 0, world, None);
        let ranks = job(world);
        for (rank, (f, w, _, _)) in ranks.iter().enumerate() {
            assert_eq!(f, &figures, "world {world}, rank {rank}: the step figures differ");
            assert!(bits(w) == bits(&weights), "world {world}, rank {rank}: the weights differ");
        }
        assert!(bits(&ranks[0].2) == bits(&state), "world {world}: rank 0's gathered optimizer state differs");
        let kept: Vec<usize> = ranks.iter().map(|r| r.3).collect();
        assert_eq!(kept.iter().sum::<usize>(), all_state, "world {world}: the shards do not cover the state once");
        assert!(kept.iter().all(|&k| k > 0 && k < all_state), "world {world}: every rank keeps a share: {kept:?}");
        assert!(figures.iter().any(|f| f.2.is_some()) && figures.iter().any(|f| f.3.iter().any(Option::is_some)));
    }
}
