//! `StreamedSamples`: Block-AP's training pairs from a `PinnedStore` through a `BatchLoader`, as the
//! `BlockSamples` that `train_block` reads. The loader runs the order `train_block` asks for (every epoch, the
//! batches in order), so each `train_pair` is the batch copied during the previous step; `pair` (validation,
//! out of that order) reads the store on the host and lets `train_step` upload it.
use super::{BatchLoader, PinnedStore};
use crate::error::{Error, Result};
use crate::gpu::{CopyStream, GpuContext};
use crate::tensor::Tensor;
use crate::train::block_ap::BlockSamples;
use crate::train::store::Stream;
use std::cell::{Cell, RefCell};
use std::sync::Arc;

pub struct StreamedSamples<'a> {
    store: RefCell<&'a mut PinnedStore>,
    loader: RefCell<BatchLoader>,
    order: Vec<(usize, usize)>,
    /// The step whose batch the loader hands out next.
    next_step: Cell<usize>,
}

impl<'a> StreamedSamples<'a> {
    /// The pairs of `epochs` epochs of `batch_size` batches in order (`train_block`'s order).
    pub fn new(
        ctx: &Arc<GpuContext>,
        copy: &Arc<CopyStream>,
        store: &'a mut PinnedStore,
        batch_size: usize,
        epochs: usize,
    ) -> Result<Self> {
        let per_epoch = store.layout().samples / batch_size.max(1);
        let order: Vec<(usize, usize)> = (0..epochs)
            .flat_map(|_| (0..per_epoch).map(|i| (i * batch_size, batch_size)))
            .collect();
        let loader = BatchLoader::new(
            ctx,
            copy,
            store,
            &[Stream::Quant, Stream::Fp],
            order.clone(),
        )?;
        Ok(StreamedSamples {
            store: RefCell::new(store),
            loader: RefCell::new(loader),
            order,
            next_step: Cell::new(0),
        })
    }
}

impl BlockSamples for StreamedSamples<'_> {
    fn len(&self) -> usize {
        self.store.borrow().layout().samples
    }

    fn pair(&self, start: usize, count: usize) -> Result<(Tensor, Tensor)> {
        self.store.borrow_mut().host_pair(start, count)
    }

    fn train_pair(&self, step: usize, start: usize, count: usize) -> Result<(Tensor, Tensor)> {
        let next = self.next_step.get();
        if step != next || self.order.get(step) != Some(&(start, count)) {
            return Err(Error::invalid(
                "StreamedSamples",
                format!(
                    "step {step} asks for samples {start}..{} but the loader copied step {next}, {:?}",
                    start + count,
                    self.order.get(next)
                ),
            ));
        }
        self.next_step.set(next + 1);
        let mut store = self.store.borrow_mut();
        let mut v = self
            .loader
            .borrow_mut()
            .next(&mut store)?
            .ok_or_else(|| Error::invalid("StreamedSamples", "more steps than batches"))?;
        let ys = v.pop().expect("targets");
        Ok((v.pop().expect("inputs"), ys))
    }
}
