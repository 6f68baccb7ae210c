//! The data-parallel step over NCCL at world size 1 (`nccl_world1`): the trainer with a NCCL
//! communicator (ZeRO-1 ownership, the reduce onto the owner, the owner-only update, the
//! broadcast, the gathered optimizer state) against the single-process trainer on the same
//! device, model and batches (`train::drive`: one micro-batch's gradient, then three steps of two
//! micro-batches).
//!
//! At one rank every collective is a copy, so what differs between the two runs is only what
//! differs between two runs of the single-process trainer: the atomics of the embedding and
//! attention backward (see `train`'s rerun checks). Hence: the first loss bitwise (the forward
//! has no atomics), the later losses within 1e-2 relative, the gradient norms within 1e-2, the
//! trained parameters and optimizer state within norm 1e-2 (element-wise a sanity bound, as
//! train's rerun). Without NCCL on the machine (libnccl.so.2) the group is a SKIP.

use super::compare::Tol;
use super::train::{dense_config, drive, model};
use super::Ctx;
use crate::backend::cuda::nccl::{NcclComm, NO_NCCL};
use crate::backend::CudaOps;
use crate::dist::{Launch, Launcher};
use crate::optim::{OptimConfig, Optimizer};
use crate::train::Trainer;
use anyhow::Result;

pub fn world1(ctx: &mut Ctx) -> Result<()> {
    ctx.case("nccl_world1", "-", |ctx| {
        let c = dense_config()?;
        let launch = Launch { launcher: Launcher::Torchrun, ..Launch::single() };
        let ops = CudaOps::new(ctx.open()?, &c)?;
        let comm = match NcclComm::init(&launch, &ops) {
            Ok(comm) => comm,
            Err(e) if e.to_string().starts_with(NO_NCCL) => {
                ctx.skip("nccl_world1", &format!("{e}"));
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let mut m_dp = model(&c)?;
        let mut o_dp = Optimizer::new(&m_dp, OptimConfig::default());
        let mut tr_dp = Trainer::new_sharded(ops, &mut m_dp, &mut o_dp, Some(Box::new(comm)))?;
        let (got, _) = drive(&mut tr_dp, &mut m_dp)?;

        let mut m_one = model(&c)?;
        let mut o_one = Optimizer::new(&m_one, OptimConfig::default());
        let mut tr_one = Trainer::new(CudaOps::new(ctx.open()?, &c)?, &mut m_one, &mut o_one)?;
        let (want, _) = drive(&mut tr_one, &mut m_one)?;

        let shape = "b2 t64 V512";
        ctx.repeat("first loss", shape, &[got.loss], &[want.loss], None);
        for (step, ((lg, ng), (lw, nw))) in got.steps.iter().zip(&want.steps).enumerate() {
            ctx.close(&format!("step {step} loss"), shape, &[*lg], &[*lw], Tol::new(0.0, 1e-2, 1e-2));
            ctx.close(&format!("step {step} grad norm"), shape, &[*ng], &[*nw], Tol::new(0.0, 1e-2, 1e-2));
        }
        tr_dp.copy_to_host(&mut m_dp, &mut o_dp)?;
        tr_one.copy_to_host(&mut m_one, &mut o_one)?;
        for (p, q) in m_dp.params.iter().zip(&m_one.params) {
            let tol = Tol::new(0.5, 0.5, 1e-2).rms_scaled(&q.tensor.data);
            ctx.close(
                &format!("trained {}", p.name),
                &format!("[{}]", q.tensor.numel()),
                &p.tensor.data,
                &q.tensor.data,
                tol,
            );
        }
        for (i, (a, b)) in o_dp.state_tensors(&m_dp).iter().zip(o_one.state_tensors(&m_one)).enumerate() {
            let tol = Tol::new(0.5, 0.5, 1e-2).rms_scaled(&b.1.data);
            ctx.close(&format!("optimizer state {} ({i})", a.0), "-", &a.1.data, &b.1.data, tol);
        }
        Ok(())
    });
    Ok(())
}
