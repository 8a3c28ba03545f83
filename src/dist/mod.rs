//! Distributed training: the collective operations data-parallel E2E-QP needs, behind one trait, and how ranks
//! find each other (`launch`).
//!
//! Implementations: [`SingleRank`] (world of one, every collective is the identity), [`loopback`] (K ranks as
//! threads of one process, for tests and CPU runs) and, with the `cuda` feature, [`nccl`] (GPUs, the unique id
//! handed out by [`launch::tcp_rendezvous`]).
pub mod launch;
pub mod loopback;
#[cfg(feature = "cuda")]
pub mod nccl;

use crate::error::Result;

/// Collectives over a fixed group of ranks. Every rank must call the same collectives in the same order with
/// buffers of the same length; a mismatch is an error on every rank, never a silent wrong answer.
pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum over all ranks, written back into `buf` on every rank. The result never depends on
    /// which rank arrived first: the loopback group adds in rank order (0, 1, ..); NCCL in its ring/tree order,
    /// fixed for a given topology.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// [`Communicator::all_reduce_sum`] of a GPU buffer, in place, ordered after the work already queued on the
    /// buffer's stream. This default goes through host memory (download, host collective, upload); NCCL reduces
    /// on the device.
    #[cfg(feature = "cuda")]
    fn all_reduce_sum_gpu(&self, buf: &mut crate::gpu::GpuBuf) -> Result<()> {
        let mut host = buf.to_vec()?;
        self.all_reduce_sum(&mut host)?;
        *buf = buf.ctx().upload(&host)?;
        Ok(())
    }
    /// Copies `root`'s `buf` into every rank's `buf`.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// A world of one rank: the single-process run.
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _buf: &mut [f32], root: usize) -> Result<()> {
        if root != 0 {
            return Err(crate::error::Error::invalid(
                "broadcast",
                format!("root {root} in a world of 1"),
            ));
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// Rank `rank`'s share of `n` items split into `world` contiguous slices as equal as possible (the first
/// `n % world` ranks take one more): the half-open range of item indices.
pub fn shard(n: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let (base, extra) = (n / world, n % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_item_once_in_order() {
        for n in [0, 1, 5, 7, 32] {
            for world in 1..=4 {
                let mut next = 0;
                for r in 0..world {
                    let s = shard(n, r, world);
                    assert_eq!(s.start, next, "n {n} world {world} rank {r}");
                    assert!(s.len() == n / world || s.len() == n / world + 1);
                    next = s.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn single_rank_is_the_identity() {
        let mut v = vec![1.5f32, -2.0];
        SingleRank.all_reduce_sum(&mut v).unwrap();
        SingleRank.broadcast(&mut v, 0).unwrap();
        SingleRank.barrier().unwrap();
        assert_eq!(v, vec![1.5, -2.0]);
        assert!(SingleRank.broadcast(&mut v, 1).is_err());
    }
}
