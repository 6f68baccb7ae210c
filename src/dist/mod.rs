//! Several processes training one model (data parallelism): where a process learns its place
//! in the job ([`Launch`], from the launcher's environment), the collectives the trainer needs
//! ([`Collectives`], over MPI on the CPU and NCCL on CUDA), and the collective timeout that ends
//! a job whose rank died or stalled instead of letting it hang. (The NCCL collectives work on
//! device buffers, so they live with the CUDA backend: `backend::NcclComm`.)
//!
//! Launchers and the variables read (the first present family wins; two families that disagree
//! are refused):
//!   torchrun   RANK, LOCAL_RANK, WORLD_SIZE (+ MASTER_ADDR, MASTER_PORT for the NCCL id)
//!   mpirun     OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_LOCAL_RANK, OMPI_COMM_WORLD_SIZE
//!   srun       SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS (used only when neither of the above
//!              is set: a batch script's SLURM_* describe the script, not mpirun's ranks)

#[cfg(feature = "mpi")]
pub mod mpi;
mod watchdog;

pub use watchdog::{
    abort_job, collective_timeout, finalize, set_abort_hook, set_collective_timeout, set_finalize_hook, CollectiveGuard,
};

use anyhow::{bail, Result};

/// Which launcher started this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher variables: one process.
    Single,
    Torchrun,
    OpenMpi,
    Slurm,
}

/// This process's place in the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub launcher: Launcher,
    pub rank: usize,
    /// Rank among the processes of this node: the GPU index a CUDA rank uses.
    pub local_rank: usize,
    pub world: usize,
    /// MASTER_ADDR, when set (the NCCL id's rendezvous host).
    pub master_addr: Option<String>,
    /// MASTER_PORT, when set.
    pub master_port: Option<u16>,
}

impl Launch {
    /// One process, no launcher.
    pub fn single() -> Launch {
        Launch { launcher: Launcher::Single, rank: 0, local_rank: 0, world: 1, master_addr: None, master_port: None }
    }

    /// From this process's environment.
    pub fn from_env() -> Result<Launch> {
        Launch::from_vars(|k| std::env::var(k).ok())
    }

    /// From the variables `get` returns (tests pass a map).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Launch> {
        let num = |k: &str| -> Result<Option<usize>> {
            match get(k) {
                None => Ok(None),
                Some(v) => match v.trim().parse::<usize>() {
                    Ok(n) => Ok(Some(n)),
                    Err(_) => bail!("{k}={v:?} is not a non-negative integer"),
                },
            }
        };
        // (rank, local rank, world) of each launcher family whose variables are present
        let family = |launcher, [r, l, w]: [&str; 3]| -> Result<Option<(Launcher, usize, usize, usize)>> {
            let (rank, local, world) = (num(r)?, num(l)?, num(w)?);
            if rank.is_none() && local.is_none() && world.is_none() {
                return Ok(None);
            }
            let need = |v: Option<usize>, k: &str| v.ok_or_else(|| anyhow::anyhow!("{k} is not set while {r}/{w} are"));
            let (rank, world) = (need(rank, r)?, need(world, w)?);
            if world == 0 {
                bail!("{w}=0: the world size must be at least 1");
            }
            if rank >= world {
                bail!("{r}={rank} must be below {w}={world}");
            }
            let local = local.unwrap_or(rank);
            if local >= world {
                bail!("{l}={local} must be below {w}={world}");
            }
            Ok(Some((launcher, rank, local, world)))
        };
        let torch = family(Launcher::Torchrun, ["RANK", "LOCAL_RANK", "WORLD_SIZE"])?;
        let ompi =
            family(Launcher::OpenMpi, ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"])?;
        let found = match (torch, ompi) {
            (Some(t), Some(o)) if (t.1, t.3) != (o.1, o.3) => bail!(
                "RANK={}/WORLD_SIZE={} conflict with OMPI_COMM_WORLD_RANK={}/OMPI_COMM_WORLD_SIZE={}: launch with one launcher",
                t.1,
                t.3,
                o.1,
                o.3
            ),
            (Some(t), _) => Some(t),
            (None, Some(o)) => Some(o),
            (None, None) => family(Launcher::Slurm, ["SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"])?,
        };
        let master_port = match get("MASTER_PORT") {
            None => None,
            Some(v) => match v.trim().parse::<u16>() {
                Ok(p) if p > 0 => Some(p),
                _ => bail!("MASTER_PORT={v:?} is not a port number (1-65535)"),
            },
        };
        let master_addr = get("MASTER_ADDR").filter(|a| !a.trim().is_empty());
        Ok(match found {
            None => Launch { master_addr, master_port, ..Launch::single() },
            Some((launcher, rank, local_rank, world)) => {
                Launch { launcher, rank, local_rank, world, master_addr, master_port }
            }
        })
    }

    /// The rendezvous address for the NCCL id: MASTER_ADDR and MASTER_PORT + 1 (torchrun's own
    /// store listens on MASTER_PORT itself).
    pub fn rendezvous(&self) -> Result<(String, u16)> {
        let Some(addr) = &self.master_addr else {
            bail!(
                "MASTER_ADDR is not set: NCCL needs the address of rank 0's host to hand out its id \
                 (torchrun sets it; under mpirun or srun export MASTER_ADDR and MASTER_PORT)"
            );
        };
        let Some(port) = self.master_port else {
            bail!("MASTER_PORT is not set: NCCL needs a free port on rank 0's host (MASTER_ADDR={addr})");
        };
        let Some(port) = port.checked_add(1) else {
            bail!("MASTER_PORT={port}: the NCCL rendezvous uses MASTER_PORT + 1, which must be a port too");
        };
        Ok((addr.clone(), port))
    }
}

/// The collectives a data-parallel step needs, over buffers of type `F` (the backend's f32
/// buffers: `Vec<f32>` on the CPU, device buffers on CUDA). Every rank calls every collective in
/// the same order; each call is watched by the collective timeout.
pub trait Collectives<F> {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// What carries the collectives ("MPI", "NCCL").
    fn name(&self) -> &'static str;
    /// On `root`: buf ← Σ over ranks of buf, added in rank order where the engine can promise it
    /// (MPI: ((b₀ + b₁) + b₂) + …); the other ranks' buf is left as it was.
    fn reduce_to(&self, buf: &mut F, root: usize) -> Result<()>;
    /// buf ← root's buf on every rank.
    fn broadcast(&self, buf: &mut F, root: usize) -> Result<()>;
    /// buf of rank `from` copied into buf of rank `to` (only those two take part; buf must
    /// already have the right length on `to`).
    fn send_to(&self, buf: &mut F, from: usize, to: usize) -> Result<()>;
    /// Every rank's `local` (the same length on every rank), concatenated in rank order.
    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<f64>>;
    /// Seconds spent inside collectives since the last call (and restarts the count).
    fn take_comm_seconds(&self) -> f64;

    /// Every rank's `local` of any length, in rank order.
    fn all_gather_var(&self, local: &[f64]) -> Result<Vec<Vec<f64>>> {
        let lens = self.all_gather_f64(&[local.len() as f64])?;
        let max = lens.iter().fold(0.0f64, |a, &b| a.max(b)) as usize;
        let mut padded = local.to_vec();
        padded.resize(max, 0.0);
        let all = self.all_gather_f64(&padded)?;
        Ok(all.chunks(max.max(1)).zip(&lens).map(|(c, &n)| c[..n as usize].to_vec()).take(self.world()).collect())
    }

    /// Whether every rank reports `ok` (the setup's agreement: a failure anywhere fails all).
    fn all_ok(&self, ok: bool) -> Result<bool> {
        Ok(self.all_gather_f64(&[f64::from(u8::from(ok))])?.iter().all(|&v| v == 1.0))
    }
}

/// Adds `parts` (one buffer per rank, rank order) into `out` as ((p₀ + p₁) + p₂) + …, the order a
/// single process accumulates micro-batch gradients in.
pub fn sum_in_rank_order(out: &mut [f32], parts: &[&[f32]]) {
    out.copy_from_slice(parts[0]);
    for p in &parts[1..] {
        for (o, v) in out.iter_mut().zip(p.iter()) {
            *o += v;
        }
    }
}

/// The collectives of a CPU rank: MPI for any launched job (world size 1 included, with the
/// `mpi` feature), None for one process; more than one rank without the feature is an error.
pub fn cpu_collectives(launch: &Launch) -> Result<Option<Box<dyn Collectives<Vec<f32>>>>> {
    if launch.launcher == Launcher::Single {
        return Ok(None);
    }
    #[cfg(feature = "mpi")]
    {
        Ok(Some(Box::new(mpi::MpiComm::init(launch)?)))
    }
    #[cfg(not(feature = "mpi"))]
    {
        if launch.world > 1 {
            return Err(missing_feature(launch, "MPI for the CPU backend's collectives", "mpi"));
        }
        Ok(None)
    }
}

/// The end of one rank's training: success finalizes the collectives; a failure of one rank of
/// several is printed with its rank and ends the whole job (the others may be waiting in a
/// collective for this one).
pub fn end_rank<T>(launch: &Launch, result: Result<T>) -> Result<T> {
    match result {
        Ok(v) => {
            finalize();
            Ok(v)
        }
        Err(e) if launch.world > 1 => {
            eprintln!("error: rank {}: {e:#}", launch.rank);
            abort_job(1)
        }
        Err(e) => Err(e),
    }
}

/// What a multi-rank launch needs and this build lacks, as an error.
pub fn missing_feature(launch: &Launch, what: &str, feature: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "world size {} (from {:?}) needs {what}, which this build lacks: rebuild with `cargo build --release --features {feature}`",
        launch.world,
        launch.launcher
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Launch> {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Launch::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn each_launcher_is_read() {
        let t = launch(&[("RANK", "3"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "h")]).unwrap();
        assert_eq!((t.launcher, t.rank, t.local_rank, t.world), (Launcher::Torchrun, 3, 1, 4));
        let o = launch(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
        ])
        .unwrap();
        assert_eq!((o.launcher, o.rank, o.world), (Launcher::OpenMpi, 1, 2));
        let s = launch(&[("SLURM_PROCID", "5"), ("SLURM_LOCALID", "1"), ("SLURM_NTASKS", "8")]).unwrap();
        assert_eq!((s.launcher, s.rank, s.local_rank, s.world), (Launcher::Slurm, 5, 1, 8));
        assert_eq!(launch(&[]).unwrap(), Launch::single());
        // mpirun inside a batch script: OMPI's ranks, not the script's SLURM_PROCID
        let both = launch(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
        ])
        .unwrap();
        assert_eq!((both.launcher, both.rank), (Launcher::OpenMpi, 1));
    }

    #[test]
    fn inconsistent_environments_name_the_variable() {
        let err = |v: &[(&str, &str)]| format!("{:#}", launch(v).unwrap_err());
        assert!(err(&[("RANK", "2"), ("WORLD_SIZE", "2")]).contains("RANK=2 must be below WORLD_SIZE=2"));
        assert!(err(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK=\"x\""));
        assert!(err(&[("WORLD_SIZE", "2")]).contains("RANK is not set"));
        assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "0")]).contains("WORLD_SIZE=0"));
        assert!(err(&[("RANK", "0"), ("LOCAL_RANK", "4"), ("WORLD_SIZE", "2")]).contains("LOCAL_RANK=4"));
        assert!(err(&[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "-1")]).contains("OMPI_COMM_WORLD_SIZE"));
        assert!(err(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "two")]).contains("SLURM_NTASKS"));
        assert!(err(&[("MASTER_PORT", "70000")]).contains("MASTER_PORT"));
        let conflict =
            err(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "2")]);
        assert!(conflict.contains("conflict with OMPI_COMM_WORLD_RANK"), "{conflict}");
        let no_addr = launch(&[("RANK", "0"), ("WORLD_SIZE", "2")]).unwrap().rendezvous().unwrap_err();
        assert!(format!("{no_addr}").contains("MASTER_ADDR is not set"));
        let l = launch(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "node1"), ("MASTER_PORT", "29500")]);
        assert_eq!(l.unwrap().rendezvous().unwrap(), ("node1".to_string(), 29501));
    }

    #[test]
    fn rank_order_sum_is_a_left_fold() {
        let (a, b, c) = ([1e8f32, 1.0], [1.0f32, 1e8], [-1e8f32, -1e8]);
        let mut out = [0.0f32; 2];
        sum_in_rank_order(&mut out, &[&a, &b, &c]);
        assert_eq!(out, [(1e8f32 + 1.0) - 1e8, (1.0f32 + 1e8) - 1e8]);
    }
}
