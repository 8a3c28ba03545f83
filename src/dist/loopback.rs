//! K ranks as threads of one process, meeting at each collective through a mutex and a condition variable.
//!
//! Each collective is a round: every rank deposits its buffer; the last to arrive combines the K buffers in rank
//! order (so sums are bitwise reproducible whatever the thread timing), publishes the result and opens the next
//! round; the others wake, copy the result and leave. A rank that waits longer than the timeout (another rank
//! died or took a different code path) gets an error instead of hanging.
use super::Communicator;
use crate::error::{Error, Result};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

struct Round {
    generation: u64,
    slots: Vec<Option<Vec<f32>>>,
    arrived: usize,
    result: std::result::Result<Arc<Vec<f32>>, String>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    round: Mutex<Round>,
    done: Condvar,
}

/// One rank's handle; create all K with [`group`] and move each into its thread.
pub struct LoopbackComm {
    rank: usize,
    shared: Arc<Shared>,
}

/// The K handles of a loopback group, rank i at index i; a collective that waits longer than `timeout` fails.
pub fn group(world: usize, timeout: Duration) -> Result<Vec<LoopbackComm>> {
    if world == 0 {
        return Err(Error::invalid("loopback", "a group of 0 ranks".to_string()));
    }
    let shared = Arc::new(Shared {
        world,
        timeout,
        round: Mutex::new(Round {
            generation: 0,
            slots: vec![None; world],
            arrived: 0,
            result: Ok(Arc::new(Vec::new())),
        }),
        done: Condvar::new(),
    });
    Ok((0..world)
        .map(|rank| LoopbackComm {
            rank,
            shared: shared.clone(),
        })
        .collect())
}

impl LoopbackComm {
    /// One round: deposits `mine`, returns `combine` of all ranks' deposits (indexed by rank).
    fn round(
        &self,
        op: &'static str,
        mine: Vec<f32>,
        combine: impl FnOnce(Vec<Vec<f32>>) -> std::result::Result<Vec<f32>, String>,
    ) -> Result<Arc<Vec<f32>>> {
        let s = &*self.shared;
        let poisoned = || Error::invalid(op, "a rank panicked inside a collective".to_string());
        let mut r = s.round.lock().map_err(|_| poisoned())?;
        let generation = r.generation;
        r.slots[self.rank] = Some(mine);
        r.arrived += 1;
        if r.arrived == s.world {
            let all: Vec<Vec<f32>> = r
                .slots
                .iter_mut()
                .map(|x| x.take().unwrap_or_default())
                .collect();
            r.result = combine(all).map(Arc::new);
            r.arrived = 0;
            r.generation += 1;
            s.done.notify_all();
        } else {
            let deadline = Instant::now() + s.timeout;
            while r.generation == generation {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::invalid(
                        op,
                        format!(
                            "rank {} waited {:?} for the other {} ranks ({} arrived): one failed or called a different collective",
                            self.rank, s.timeout, s.world - 1, r.arrived - 1
                        ),
                    ));
                }
                r = s.done.wait_timeout(r, left).map_err(|_| poisoned())?.0;
            }
        }
        r.result.clone().map_err(|msg| Error::invalid(op, msg))
    }
}

fn same_lengths(op: &'static str, all: &[Vec<f32>]) -> std::result::Result<usize, String> {
    let n = all[0].len();
    if all.iter().any(|b| b.len() != n) {
        let lens: Vec<usize> = all.iter().map(|b| b.len()).collect();
        return Err(format!("{op}: buffers of lengths {lens:?} by rank"));
    }
    Ok(n)
}

impl Communicator for LoopbackComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let sum = self.round("all_reduce_sum", buf.to_vec(), |all| {
            let n = same_lengths("all_reduce_sum", &all)?;
            let mut acc = vec![0.0f32; n];
            for b in &all {
                crate::ops::simd::add_assign(&mut acc, b);
            }
            Ok(acc)
        })?;
        buf.copy_from_slice(&sum);
        Ok(())
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let world = self.shared.world;
        if root >= world {
            return Err(Error::invalid(
                "broadcast",
                format!("root {root} in a world of {world}"),
            ));
        }
        let v = self.round("broadcast", buf.to_vec(), |mut all| {
            same_lengths("broadcast", &all)?;
            Ok(std::mem::take(&mut all[root]))
        })?;
        buf.copy_from_slice(&v);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.round("barrier", Vec::new(), |_| Ok(Vec::new()))
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::rng::Rng;

    const T: Duration = Duration::from_secs(30);

    /// Runs `f` on every rank of a fresh group, each in its own thread; results by rank.
    fn on_ranks<R: Send>(world: usize, f: impl Fn(&LoopbackComm) -> R + Sync) -> Vec<R> {
        let comms = group(world, T).unwrap();
        std::thread::scope(|s| {
            let hs: Vec<_> = comms.iter().map(|c| s.spawn(|| f(c))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn all_reduce_sums_in_rank_order_on_every_rank() {
        for world in [1, 2, 3, 5] {
            let n = 37;
            let inputs: Vec<Vec<f32>> = (0..world)
                .map(|r| Rng::new(10 + r as u64).normal_vec(n, 1.0))
                .collect();
            let mut want = vec![0.0f32; n];
            for b in &inputs {
                for (w, x) in want.iter_mut().zip(b) {
                    *w += x;
                }
            }
            // Many rounds with jittered arrival: the bits never change.
            let got = on_ranks(world, |c| {
                let mut out = Vec::new();
                for round in 0..20 {
                    if (round + c.rank()) % 3 == 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    let mut b = inputs[c.rank()].clone();
                    c.all_reduce_sum(&mut b).unwrap();
                    out.push(b);
                }
                out
            });
            for per_rank in &got {
                for b in per_rank {
                    let bits: Vec<u32> = b.iter().map(|x| x.to_bits()).collect();
                    let want_bits: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
                    assert_eq!(bits, want_bits, "world {world}");
                }
            }
        }
    }

    #[test]
    fn broadcast_and_barrier() {
        let got = on_ranks(3, |c| {
            let mut b = vec![c.rank() as f32; 4];
            c.broadcast(&mut b, 2).unwrap();
            c.barrier().unwrap();
            b
        });
        assert!(got.iter().all(|b| b == &vec![2.0; 4]));
    }

    #[test]
    fn mismatched_lengths_fail_on_every_rank() {
        let got = on_ranks(2, |c| {
            let mut b = vec![1.0; 3 + c.rank()];
            c.all_reduce_sum(&mut b).map_err(|e| e.to_string())
        });
        for r in got {
            let e = r.unwrap_err();
            assert!(e.contains("[3, 4]"), "{e}");
        }
    }

    #[test]
    fn a_missing_rank_times_out_instead_of_hanging() {
        let comms = group(2, Duration::from_millis(100)).unwrap();
        let e = comms[0].barrier().unwrap_err().to_string();
        assert!(
            e.contains("rank 0 waited") && e.contains("0 arrived"),
            "{e}"
        );
        assert!(group(0, T).is_err());
    }
}
