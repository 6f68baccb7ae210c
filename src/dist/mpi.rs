//! [`Collectives`] over MPI for the CPU backend (`--features mpi`; Open MPI from Debian's
//! packages). MPI is initialized here, once per process, with full thread support so the
//! collective timeout's watchdog thread may call MPI_Abort. MPI is finalized only at a
//! successful end (`dist::finalize`): a failing rank aborts the job instead, since MPI_Finalize
//! would wait for ranks that wait for it.

use super::{sum_in_rank_order, CollectiveGuard, Collectives, Launch};
use anyhow::{bail, Result};
use mpi::collective::{CommunicatorCollectives, Root};
use mpi::point_to_point::{Destination, Source};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;
use std::cell::Cell;
use std::time::Instant;

/// Floats per gather of a reduction: bounds the root's temporary to world × 4 MiB.
const REDUCE_CHUNK: usize = 1 << 20;

pub struct MpiComm {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    comm_s: Cell<f64>,
}

impl MpiComm {
    /// Initializes MPI and checks that its ranks are the launcher's.
    pub fn init(launch: &Launch) -> Result<MpiComm> {
        let Some((universe, _threading)) = mpi::initialize_with_threading(Threading::Multiple) else {
            bail!("MPI was already initialized in this process");
        };
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if (rank, size) != (launch.rank, launch.world) {
            bail!(
                "MPI says rank {rank} of {size}, the launcher's environment rank {} of {} ({:?}): launch with mpirun, \
                 or with srun built against the same MPI",
                launch.rank,
                launch.world,
                launch.launcher
            );
        }
        super::set_abort_hook(Box::new(|code| {
            // SAFETY: MPI is initialized with MPI_THREAD_MULTIPLE (or the best the library has);
            // MPI_Abort ends every rank and does not return on Open MPI.
            unsafe {
                mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, code);
            }
        }));
        // The universe would finalize MPI when dropped; `dist::finalize` does it at a good end.
        std::mem::forget(universe);
        super::set_finalize_hook(Box::new(|| {
            // SAFETY: called once, from the main thread, after the last collective.
            unsafe {
                mpi::ffi::MPI_Finalize();
            }
        }));
        Ok(MpiComm { world, rank, size, comm_s: Cell::new(0.0) })
    }

    /// Runs `f` as collective `name`, watched by the timeout and timed.
    fn timed<T>(&self, name: &'static str, f: impl FnOnce() -> T) -> T {
        let _watch = CollectiveGuard::start(self.rank, name);
        let t0 = Instant::now();
        let out = f();
        self.comm_s.set(self.comm_s.get() + t0.elapsed().as_secs_f64());
        out
    }
}

impl Collectives<Vec<f32>> for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.size
    }
    fn name(&self) -> &'static str {
        "MPI"
    }

    /// A gather to the root and a sum there in rank order (MPI_Reduce promises no order).
    fn reduce_to(&self, buf: &mut Vec<f32>, root: usize) -> Result<()> {
        self.timed("reduce", || {
            let proc = self.world.process_at_rank(root as i32);
            let mut gathered =
                if self.rank == root { vec![0.0f32; self.size * REDUCE_CHUNK.min(buf.len())] } else { vec![] };
            for chunk in buf.chunks_mut(REDUCE_CHUNK) {
                let n = chunk.len();
                if self.rank == root {
                    proc.gather_into_root(&chunk[..], &mut gathered[..self.size * n]);
                    let parts: Vec<&[f32]> = gathered[..self.size * n].chunks(n).collect();
                    sum_in_rank_order(chunk, &parts);
                } else {
                    proc.gather_into(&chunk[..]);
                }
            }
        });
        Ok(())
    }

    fn broadcast(&self, buf: &mut Vec<f32>, root: usize) -> Result<()> {
        self.timed("broadcast", || self.world.process_at_rank(root as i32).broadcast_into(&mut buf[..]));
        Ok(())
    }

    fn send_to(&self, buf: &mut Vec<f32>, from: usize, to: usize) -> Result<()> {
        if from == to {
            return Ok(());
        }
        self.timed("send", || {
            if self.rank == from {
                self.world.process_at_rank(to as i32).send(&buf[..]);
            } else if self.rank == to {
                self.world.process_at_rank(from as i32).receive_into(&mut buf[..]);
            }
        });
        Ok(())
    }

    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<f64>> {
        let mut out = vec![0.0f64; local.len() * self.size];
        if !local.is_empty() {
            self.timed("all_gather", || self.world.all_gather_into(local, &mut out[..]));
        }
        Ok(out)
    }

    fn take_comm_seconds(&self) -> f64 {
        self.comm_s.replace(0.0)
    }
}
