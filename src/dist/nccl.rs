//! The NCCL communicator (the `cuda` feature): the same collectives as the loopback group, between GPUs, over
//! NVLink/PCIe inside a host and the network between hosts. The host `&mut [f32]` collectives of
//! [`Communicator`] upload, run on the GPU's stream and download (a staging copy that costs PCIe time but keeps
//! every caller backend-agnostic); `all_reduce_sum_gpu` sums a device buffer in place, with no copy.
//!
//! Two ways to build a group: [`NcclComm::group`] for one process driving several GPUs (one communicator per
//! GPU, `ncclCommInitAll`), and [`NcclComm::from_launch`] for one process per GPU, where rank 0 draws the NCCL
//! unique id and hands it to the others through the TCP rendezvous on MASTER_ADDR (`launch::tcp_rendezvous`).
//! NCCL sums in its own ring/tree order, not rank order: results agree with the loopback group within float
//! tolerance, and are reproducible for a fixed topology.
use super::launch::{tcp_rendezvous, LaunchEnv};
use super::Communicator;
use crate::error::{Error, Result};
use crate::gpu::{GpuBuf, GpuContext};
use cudarc::driver::CudaSlice;
use cudarc::nccl::{Comm, Id, ReduceOp};
use std::sync::Arc;
use std::time::Duration;

/// Bytes of an NCCL unique id (`ncclUniqueId`).
pub const ID_BYTES: usize = 128;

/// One rank's NCCL communicator on its GPU.
pub struct NcclComm {
    comm: Comm,
    ctx: Arc<GpuContext>,
}

// SAFETY: an NCCL communicator may move between threads; it is never used by two threads at once, because
// NcclComm is not Sync and every collective takes &self from the one thread that owns it.
unsafe impl Send for NcclComm {}

fn nccl_err(what: &str) -> impl FnOnce(cudarc::nccl::result::NcclError) -> Error + '_ {
    move |e| Error::invalid("nccl", format!("{what}: {e:?} (NCCL_DEBUG=INFO says more)"))
}

/// The NCCL library must be loadable before any NCCL call: cudarc panics where it is not.
fn nccl_present() -> Result<()> {
    // SAFETY: only tries to open the library by its candidate names.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Ok(());
    }
    Err(Error::invalid(
        "nccl",
        "libnccl could not be loaded: put a directory with libnccl.so (or libnccl.so.13) on LD_LIBRARY_PATH; \
         the libnccl.so.2 of the nvidia-nccl wheels needs a libnccl.so link beside it"
            .to_string(),
    ))
}

impl NcclComm {
    /// One communicator per GPU of this process, rank i on `ctxs[i]` (distinct GPUs: NCCL refuses two ranks
    /// on one GPU).
    pub fn group(ctxs: &[Arc<GpuContext>]) -> Result<Vec<NcclComm>> {
        nccl_present()?;
        let streams = ctxs.iter().map(|c| c.stream().clone()).collect();
        let comms = Comm::from_devices(streams).map_err(nccl_err("ncclCommInitAll"))?;
        Ok(comms
            .into_iter()
            .zip(ctxs)
            .map(|(comm, ctx)| NcclComm {
                comm,
                ctx: ctx.clone(),
            })
            .collect())
    }

    /// This process's rank of a launcher-started world (torchrun or Slurm variables, see [`LaunchEnv`]), on
    /// `ctx`: rank 0 draws the unique id, the TCP rendezvous gives it to every rank, then all ranks join.
    pub fn from_launch(
        env: &LaunchEnv,
        ctx: &Arc<GpuContext>,
        timeout: Duration,
    ) -> Result<NcclComm> {
        nccl_present()?;
        let id = if env.rank == 0 {
            let id = Id::new().map_err(nccl_err("ncclGetUniqueId"))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let blob = tcp_rendezvous(env, &id, timeout)?;
        Self::from_id(ctx, env.rank, env.world_size, &blob)
    }

    /// Rank `rank` of `world` ranks that share the unique id `id` (ID_BYTES bytes from rank 0).
    pub fn from_id(
        ctx: &Arc<GpuContext>,
        rank: usize,
        world: usize,
        id: &[u8],
    ) -> Result<NcclComm> {
        let bytes: [u8; ID_BYTES] = id.try_into().map_err(|_| {
            Error::invalid(
                "nccl",
                format!("unique id of {} bytes, expected {ID_BYTES}", id.len()),
            )
        })?;
        if rank >= world {
            return Err(Error::invalid(
                "nccl",
                format!("rank {rank} of a world of {world}"),
            ));
        }
        nccl_present()?;
        let id = Id::uninit(bytes.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(ctx.stream().clone(), rank, world, id)
            .map_err(nccl_err("ncclCommInitRank"))?;
        Ok(NcclComm {
            comm,
            ctx: ctx.clone(),
        })
    }

    fn upload(&self, buf: &[f32]) -> Result<CudaSlice<f32>> {
        self.ctx
            .stream()
            .clone_htod(buf)
            .map_err(|e| Error::invalid("nccl", format!("upload of {} floats: {e}", buf.len())))
    }

    fn download(&self, dev: &CudaSlice<f32>, buf: &mut [f32]) -> Result<()> {
        self.ctx.stream().memcpy_dtoh(dev, buf).map_err(|e| {
            Error::invalid("nccl", format!("download of {} floats: {e}", buf.len()))
        })?;
        self.ctx.synchronize()
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world_size(&self) -> usize {
        self.comm.world_size()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut dev = self.upload(buf)?;
        self.comm
            .all_reduce_in_place(&mut dev, &ReduceOp::Sum)
            .map_err(nccl_err("all-reduce"))?;
        self.download(&dev, buf)
    }
    /// On the device, on the communicator's stream (the context's one stream, so after the kernels that made
    /// `buf`); the buffer must live on this communicator's GPU.
    fn all_reduce_sum_gpu(&self, buf: &mut GpuBuf) -> Result<()> {
        if buf.ctx().ordinal() != self.ctx.ordinal() {
            return Err(Error::invalid(
                "nccl",
                format!(
                    "all-reduce of a buffer on cuda:{} by the communicator of cuda:{}",
                    buf.ctx().ordinal(),
                    self.ctx.ordinal()
                ),
            ));
        }
        let Some(mut view) = buf.view_mut() else {
            return Ok(());
        };
        self.comm
            .all_reduce_in_place(&mut view, &ReduceOp::Sum)
            .map_err(nccl_err("all-reduce on the device"))?;
        Ok(())
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        if root >= self.world_size() {
            return Err(Error::invalid(
                "broadcast",
                format!("root {root} in a world of {}", self.world_size()),
            ));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let mut dev = self.upload(buf)?;
        self.comm
            .broadcast_in_place(&mut dev, root as i32)
            .map_err(nccl_err("broadcast"))?;
        self.download(&dev, buf)
    }
    fn barrier(&self) -> Result<()> {
        let mut one = [1.0f32];
        self.all_reduce_sum(&mut one)
    }
}
