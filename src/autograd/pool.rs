//! Host buffers recycled between training steps, so a reused tape allocates nothing after its first step.

/// At most this many free buffers are kept: tensors made outside the pool (scalars, saved state) also come back
/// on `reset`, and without a bound a long run would grow the free list by a few entries every step.
const MAX_FREE: usize = 1024;

#[derive(Default, Debug)]
pub struct BufferPool {
    free: Vec<Vec<f32>>,
}

impl BufferPool {
    /// A zeroed buffer of `n` values: the smallest free buffer whose capacity suffices, else a new one.
    pub fn take_zeroed(&mut self, n: usize) -> Vec<f32> {
        let best = self
            .free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= n)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        let mut buf = match best {
            Some(i) => self.free.swap_remove(i),
            None => Vec::with_capacity(n),
        };
        buf.clear();
        buf.resize(n, 0.0);
        buf
    }

    /// Returns a buffer for reuse; when the pool is full the smallest buffer is the one dropped.
    pub fn give(&mut self, buf: Vec<f32>) {
        if buf.capacity() == 0 {
            return;
        }
        if self.free.len() < MAX_FREE {
            self.free.push(buf);
            return;
        }
        let (i, smallest) = self
            .free
            .iter()
            .enumerate()
            .map(|(i, b)| (i, b.capacity()))
            .min_by_key(|&(_, c)| c)
            .expect("a full pool is not empty");
        if buf.capacity() > smallest {
            self.free[i] = buf;
        }
    }

    /// Total capacity held, in values (for tests that check reuse).
    pub fn held(&self) -> usize {
        self.free.iter().map(|b| b.capacity()).sum()
    }
}
