//! The streamed benchmark's weight source: block b's nine tensors (two norms, seven linears) generated on the
//! host from a seed, f16, into pinned buffers by a background thread, and copied to the GPU on the copy stream one
//! tensor per training step while the previous block trains; `take` converts them to f32 for the tape. Only the
//! block in training and the next one are on the GPU; the host holds one block's f16 tensors.
//!
//! Values: element i of tensor k of block b hashes (seed + 16·b + k, i) as `cuda/random.cu` does, to a uniform
//! u in [0, 1): norms 0.8 + 0.4·u, linears uniform with the standard deviation 0.02 of the resident bench's
//! N(0, 0.02²) (a normal by Box-Muller on 4 threads took longer than a 70B block's bench epoch: seen on the
//! H100, the host waited 4.5 s at block switches; step speed does not depend on the distribution).
use crate::error::{Error, Result};
use crate::gpu::{CopyStream, GpuBuf, GpuContext, PinnedBuf};
use crate::model::llama::{BlockWeights, LlamaConfig};
use crate::train::stream::f16_to_f32;
use half::f16;
use rayon::prelude::*;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// Threads generating weights: half of the device host's 16 cores, leaving the thread that queues the GPU's
/// work a core (with all 16, a 70B block's propagation ran 4x slower while the next block was generated).
const GENERATOR_THREADS: usize = 8;

/// (block, tensor index, host buffer).
type Job = (usize, usize, PinnedBuf);

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Tensor `k` of a block as f16 bytes: k < 2 a norm, else a linear.
fn generate(dst: &mut [u8], seed: u64, k: usize) {
    const CHUNK: usize = 1 << 16;
    dst.par_chunks_mut(2 * CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (j, out) in chunk.chunks_exact_mut(2).enumerate() {
                let h = mix(seed ^ mix((c * CHUNK + j) as u64));
                let u = (h >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
                let v = match k {
                    0 | 1 => 0.8 + 0.4 * u,
                    // Uniform on [−a, a] has standard deviation a/√3.
                    _ => 0.02 * 3f32.sqrt() * (2.0 * u - 1.0),
                };
                out.copy_from_slice(&f16::from_f32(v).to_le_bytes());
            }
        });
}

pub struct WeightPrefetch {
    ctx: Arc<GpuContext>,
    copy: Arc<CopyStream>,
    shapes: Vec<Vec<usize>>,
    jobs: Option<Sender<Job>>,
    done: Receiver<Job>,
    handle: Option<JoinHandle<()>>,
    /// Host buffers not at the generator, by tensor.
    free: Vec<Option<PinnedBuf>>,
    /// The next block's tensors on the device (f16), by tensor.
    staged: Vec<Option<GpuBuf>>,
    /// The block being prefetched and how many of its tensors the generator still holds.
    block: Option<usize>,
    outstanding: usize,
}

impl WeightPrefetch {
    pub fn new(
        ctx: &Arc<GpuContext>,
        copy: &Arc<CopyStream>,
        cfg: &LlamaConfig,
        seed: u64,
    ) -> Result<Self> {
        let mut shapes = vec![vec![cfg.hidden], vec![cfg.hidden]];
        shapes.extend(cfg.linear_shapes().iter().map(|&(_, n, k)| vec![n, k]));
        let mut free = Vec::with_capacity(shapes.len());
        for s in &shapes {
            free.push(Some(ctx.alloc_pinned(2 * s.iter().product::<usize>())?));
        }
        let (jobs, rx) = channel::<Job>();
        let (tx, done) = channel();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(GENERATOR_THREADS)
            .build()
            .map_err(|e| Error::invalid("WeightPrefetch", format!("thread pool: {e}")))?;
        let handle = std::thread::spawn(move || {
            for (b, k, mut buf) in rx {
                // as_mut_slice waits for the buffer's previous copy to the device.
                if let Ok(dst) = buf.as_mut_slice() {
                    pool.install(|| generate(dst, seed.wrapping_add(16 * b as u64 + k as u64), k));
                }
                if tx.send((b, k, buf)).is_err() {
                    return;
                }
            }
        });
        Ok(WeightPrefetch {
            ctx: ctx.clone(),
            copy: copy.clone(),
            staged: shapes.iter().map(|_| None).collect(),
            shapes,
            jobs: Some(jobs),
            done,
            handle: Some(handle),
            free,
            block: None,
            outstanding: 0,
        })
    }

    /// Bytes of one block in f16 (what the host buffers and the device staging hold).
    pub fn block_bytes(&self) -> usize {
        self.shapes
            .iter()
            .map(|s| 2 * s.iter().product::<usize>())
            .sum()
    }

    /// Starts generating block `b` (the previous block must have been taken).
    pub fn start(&mut self, b: usize) -> Result<()> {
        if self.block.is_some() {
            return Err(Error::invalid(
                "WeightPrefetch",
                "a block is already in flight",
            ));
        }
        for k in 0..self.shapes.len() {
            let buf = self.free[k]
                .take()
                .expect("all buffers home between blocks");
            self.jobs
                .as_ref()
                .expect("open while alive")
                .send((b, k, buf))
                .map_err(|_| Error::invalid("WeightPrefetch", "the generator thread stopped"))?;
        }
        self.block = Some(b);
        self.outstanding = self.shapes.len();
        Ok(())
    }

    fn stage(&mut self, (_, k, mut buf): Job) -> Result<()> {
        let bytes = buf.len();
        let mut dev = self.ctx.alloc(bytes.div_ceil(4))?;
        // The buffer comes from the compute stream's allocator: the copy waits for its earlier uses.
        self.copy.wait(&self.ctx.record()?)?;
        self.copy.htod(&mut buf, 0, &mut dev, 0, bytes)?;
        self.staged[k] = Some(dev);
        self.free[k] = Some(buf);
        self.outstanding -= 1;
        Ok(())
    }

    /// Queues the copy of at most one generated tensor (call once per training step: one tensor of at most a
    /// few hundred MB per step stays hidden behind the step's compute).
    pub fn poll(&mut self) -> Result<()> {
        match self.done.try_recv() {
            Ok(job) => self.stage(job),
            Err(_) => Ok(()),
        }
    }

    /// The prefetched block as f32 device tensors, and the milliseconds the host waited for the generator.
    pub fn take(&mut self) -> Result<(BlockWeights, f64)> {
        let t0 = Instant::now();
        while self.outstanding > 0 {
            let job = self
                .done
                .recv()
                .map_err(|_| Error::invalid("WeightPrefetch", "the generator thread stopped"))?;
            self.stage(job)?;
        }
        let waited = t0.elapsed().as_secs_f64() * 1e3;
        self.ctx.wait(&self.copy.record()?)?;
        let mut t = Vec::with_capacity(self.shapes.len());
        for (k, shape) in self.shapes.iter().enumerate() {
            let dev = self.staged[k].take().expect("staged above");
            // The staging buffer returns to the allocator after the conversion queued on the compute stream.
            t.push(f16_to_f32(&self.ctx, &dev, 0, shape)?);
        }
        self.block = None;
        let linears: Vec<_> = t.drain(2..).collect();
        let (ffn_norm, attn_norm) = (t.pop().expect("two norms"), t.pop().expect("two norms"));
        Ok((
            BlockWeights {
                attn_norm,
                ffn_norm,
                linears: linears.try_into().expect("seven linears"),
            },
            waited,
        ))
    }
}

impl Drop for WeightPrefetch {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        let _ = self.copy.synchronize();
    }
}
