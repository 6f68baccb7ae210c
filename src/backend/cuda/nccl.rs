//! [`Collectives`] over NCCL for the CUDA backend (cudarc's `nccl`, loaded at run time like the
//! driver: building needs nothing CUDA). Rank 0 creates the NCCL id and hands it to the other
//! ranks over TCP at MASTER_ADDR:MASTER_PORT+1 (torchrun's own store holds MASTER_PORT); every
//! collective runs on the backend's stream (the legacy default stream, so the kernels before and
//! after are ordered with it) and is waited for inside the collective timeout's watch.
//!
//! Written against NCCL's documented API and compiled, not run yet: the GPU check's
//! `nccl_world1` stage runs it at world size 1; no machine with several GPUs is available.

use super::ops::CudaOps;
use super::{CudaBackend, DeviceBuffer};
use crate::dist::{CollectiveGuard, Collectives, Launch, Launcher};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::nccl::{result as nccl, sys};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const ID_BYTES: usize = 128;

/// The start of the error when the library is missing (the GPU check's stage skips on it).
pub const NO_NCCL: &str = "cannot load NCCL (libnccl.so.2)";

pub struct NcclComm {
    comm: sys::ncclComm_t,
    rank: usize,
    size: usize,
    comm_s: Cell<f64>,
    /// A handle on the same device for the small staging buffers of `all_gather_f64`.
    staging: CudaBackend,
}

/// The collectives of a CUDA rank: NCCL for any launched job (world size 1 included), None for
/// one process without a launcher.
pub fn collectives(launch: &Launch, ops: &CudaOps) -> Result<Option<Box<dyn Collectives<DeviceBuffer<f32>>>>> {
    if launch.launcher == Launcher::Single {
        return Ok(None);
    }
    Ok(Some(Box::new(NcclComm::init(launch, ops)?)))
}

impl NcclComm {
    /// Joins the job's NCCL communicator on `ops`' device.
    pub fn init(launch: &Launch, ops: &CudaOps) -> Result<NcclComm> {
        ops.be.synchronize().map_err(|e| anyhow!("{e}"))?; // (binds the device's context to this thread)
                                                           // SAFETY: only tries to open the library (cudarc panics on a call when it is missing).
        if !unsafe { sys::is_culib_present() } {
            bail!(
                "{NO_NCCL} for world size {} (install NCCL, e.g. the nvidia-nccl-cu12 wheel's lib on LD_LIBRARY_PATH)",
                launch.world
            );
        }
        let version = nccl::get_nccl_version()
            .map_err(|e| anyhow!("cannot load NCCL (libnccl.so.2) for world size {}: {e:?}", launch.world))?;
        let id = if launch.world == 1 {
            nccl::get_uniqueid().map_err(|e| anyhow!("ncclGetUniqueId: {e:?}"))?
        } else {
            exchange_id(launch)?
        };
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        {
            let _watch = CollectiveGuard::start(launch.rank, "ncclCommInitRank");
            // SAFETY: comm is a valid out-pointer; the id is the job's, the rank below the size.
            unsafe { nccl::comm_init_rank(&mut comm, launch.world as i32, id, launch.rank as i32) }.map_err(|e| {
                anyhow!("ncclCommInitRank (NCCL {version}, rank {} of {}): {e:?}", launch.rank, launch.world)
            })?;
        }
        let staging = CudaBackend::new(ops.be.ordinal()).map_err(|e| anyhow!("{e}"))?;
        Ok(NcclComm { comm, rank: launch.rank, size: launch.world, comm_s: Cell::new(0.0), staging })
    }

    /// Runs the NCCL calls of `f` as collective `name` and waits for them (watched and timed).
    fn run(&self, name: &'static str, f: impl FnOnce(sys::cudaStream_t) -> Result<(), nccl::NcclError>) -> Result<()> {
        let _watch = CollectiveGuard::start(self.rank, name);
        let t0 = Instant::now();
        f(std::ptr::null_mut()).map_err(|e| anyhow!("NCCL {name}: {e:?}"))?;
        cudarc::driver::result::ctx::synchronize().map_err(|e| anyhow!("after NCCL {name}: {e:?}"))?;
        self.comm_s.set(self.comm_s.get() + t0.elapsed().as_secs_f64());
        Ok(())
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: the communicator is ours and no collective is in flight (each one is waited for).
        let _ = unsafe { nccl::comm_destroy(self.comm) };
    }
}

fn ptr(b: &DeviceBuffer<f32>) -> *mut std::ffi::c_void {
    b.ptr() as usize as *mut std::ffi::c_void
}

impl Collectives<DeviceBuffer<f32>> for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.size
    }
    fn name(&self) -> &'static str {
        "NCCL"
    }

    /// ncclReduce (in place): NCCL chooses the order of the sum, so ranks > 2 agree with one
    /// process only within f32 rounding.
    fn reduce_to(&self, buf: &mut DeviceBuffer<f32>, root: usize) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let (p, n) = (ptr(buf), buf.len());
        self.run("reduce", |s| {
            // SAFETY: p holds n f32 on this device; in place is allowed.
            unsafe {
                nccl::reduce(
                    p,
                    p,
                    n,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    root as i32,
                    self.comm,
                    s,
                )
            }
            .map(|_| ())
        })
    }

    fn broadcast(&self, buf: &mut DeviceBuffer<f32>, root: usize) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let (p, n) = (ptr(buf), buf.len());
        // SAFETY: p holds n f32 on this device; in place is allowed.
        self.run("broadcast", |s| {
            unsafe { nccl::broadcast(p, p, n, sys::ncclDataType_t::ncclFloat32, root as i32, self.comm, s) }.map(|_| ())
        })
    }

    fn send_to(&self, buf: &mut DeviceBuffer<f32>, from: usize, to: usize) -> Result<()> {
        if from == to || buf.is_empty() || (self.rank != from && self.rank != to) {
            return Ok(());
        }
        let (p, n) = (ptr(buf), buf.len());
        let (me, comm) = (self.rank, self.comm);
        self.run("send", |s| {
            nccl::group_start()?;
            // SAFETY: p holds n f32 on this device (the receiver's buffer has the sender's length).
            let r = unsafe {
                if me == from {
                    nccl::send(p, n, sys::ncclDataType_t::ncclFloat32, to as i32, comm, s)
                } else {
                    nccl::recv(p, n, sys::ncclDataType_t::ncclFloat32, from as i32, comm, s)
                }
            };
            let end = nccl::group_end();
            r.and(end).map(|_| ())
        })
    }

    /// Through the device: the f64 values' bytes gathered as bytes (a copy, so every bit stays).
    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<f64>> {
        if local.is_empty() {
            return Ok(Vec::new());
        }
        let be = &self.staging;
        let words: Vec<f32> = local.iter().flat_map(|v| split_f64(*v)).collect();
        let send = DeviceBuffer::from_host(be, &words).map_err(|e| anyhow!("{e}"))?;
        let recv = DeviceBuffer::<f32>::zeros(be, words.len() * self.size).map_err(|e| anyhow!("{e}"))?;
        let (sp, rp, bytes, comm) = (ptr(&send), ptr(&recv), words.len() * 4, self.comm);
        // SAFETY: send holds `bytes` bytes, recv world × bytes.
        self.run("all_gather", |s| {
            unsafe { nccl::all_gather(sp, rp, bytes, sys::ncclDataType_t::ncclUint8, comm, s) }.map(|_| ())
        })?;
        let got = recv.to_host().map_err(|e| anyhow!("{e}"))?;
        Ok(got.chunks(2).map(|w| join_f64([w[0], w[1]])).collect())
    }

    fn take_comm_seconds(&self) -> f64 {
        self.comm_s.replace(0.0)
    }
}

fn split_f64(v: f64) -> [f32; 2] {
    let b = v.to_bits();
    [f32::from_bits(b as u32), f32::from_bits((b >> 32) as u32)]
}

fn join_f64(w: [f32; 2]) -> f64 {
    f64::from_bits(u64::from(w[0].to_bits()) | (u64::from(w[1].to_bits()) << 32))
}

/// Rank 0 creates the NCCL id and sends it to every other rank over TCP; the others connect
/// (retrying until the collective timeout) and read it.
fn exchange_id(launch: &Launch) -> Result<sys::ncclUniqueId> {
    let (addr, port) = launch.rendezvous()?;
    let timeout = crate::dist::collective_timeout()?;
    if launch.rank == 0 {
        let id = nccl::get_uniqueid().map_err(|e| anyhow!("ncclGetUniqueId: {e:?}"))?;
        let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
        let listener = TcpListener::bind(("0.0.0.0", port))
            .with_context(|| format!("rank 0: cannot listen on port {port} (MASTER_PORT + 1) for the NCCL id"))?;
        listener.set_nonblocking(true)?;
        let t0 = Instant::now();
        let mut served = 0;
        while served + 1 < launch.world {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false)?;
                    s.write_all(&bytes).context("sending the NCCL id")?;
                    served += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if t0.elapsed() > timeout {
                        bail!(
                            "rank 0: only {served} of {} ranks fetched the NCCL id within {} s",
                            launch.world - 1,
                            timeout.as_secs_f64()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e).context("accepting a rank's connection for the NCCL id"),
            }
        }
        return Ok(id);
    }
    let t0 = Instant::now();
    loop {
        let target =
            (addr.as_str(), port).to_socket_addrs().with_context(|| format!("MASTER_ADDR={addr}: cannot resolve"))?;
        for a in target {
            if let Ok(mut s) = TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
                s.set_read_timeout(Some(timeout))?;
                let mut buf = [0u8; ID_BYTES];
                s.read_exact(&mut buf)
                    .with_context(|| format!("rank {}: reading the NCCL id from {a}", launch.rank))?;
                let mut id = sys::ncclUniqueId { internal: [0; ID_BYTES] };
                for (d, b) in id.internal.iter_mut().zip(buf) {
                    *d = b as _;
                }
                return Ok(id);
            }
        }
        if t0.elapsed() > timeout {
            bail!(
                "rank {}: no NCCL id from rank 0 at {addr}:{port} (MASTER_ADDR:MASTER_PORT+1) within {} s",
                launch.rank,
                timeout.as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn f64_bits_survive_the_f32_words() {
        for v in [0.0, -0.0, 1.5e-300, f64::MAX, -3.25, f64::NAN] {
            let back = super::join_f64(super::split_f64(v));
            assert_eq!(back.to_bits(), v.to_bits());
        }
    }
}
