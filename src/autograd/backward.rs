//! The `Backward` trait every op implements, with the tape's optional fast paths (see the methods' docs).
use crate::error::Result;
use crate::tensor::Tensor;

/// The backward of one op. `dinputs[i]` is `Some(zeroed tensor shaped like input i)` exactly when input i needs a
/// gradient (uninitialised on a GPU when `overwrites_dinputs`); the op fills it. Whatever the forward saved lives in
/// the implementing struct.
pub trait Backward: Send + Sync {
    fn name(&self) -> &'static str;
    fn backward(
        &self,
        inputs: &[&Tensor],
        output: &Tensor,
        dout: &Tensor,
        dinputs: &mut [Option<Tensor>],
    ) -> Result<()>;

    /// True when `backward` writes every element of every slot it is given: the tape may then hand it
    /// uninitialised device buffers instead of zeroed ones (one memset per gradient saved). Poisoned contexts
    /// (`GpuContext::set_poison`) fill those buffers with NaN, so an op that claims this wrongly fails its tests.
    fn overwrites_dinputs(&self) -> bool {
        false
    }

    /// True when `backward_into` can add input `i`'s gradient into a buffer that already holds that input's
    /// gradient (a GEMM with beta = 1, a kernel that reads before it writes), saving the tape's `+=` pass.
    fn accumulates(&self, i: usize) -> bool {
        let _ = i;
        false
    }

    /// `backward` where `accumulate[i]` says that `dinputs[i]` holds input i's gradient so far, to be added to
    /// (`+=`) rather than written; the tape sets it only where `accumulates(i)`.
    fn backward_into(
        &self,
        inputs: &[&Tensor],
        output: &Tensor,
        dout: &Tensor,
        dinputs: &mut [Option<Tensor>],
        accumulate: &[bool],
    ) -> Result<()> {
        let _ = accumulate;
        self.backward(inputs, output, dout, dinputs)
    }

    /// True when every input's gradient equals `dout`, reshaped to the input (a reshape, an elementwise sum of
    /// same-shaped inputs): the tape then moves `dout` into the input's gradient slot (or adds it into one that
    /// holds a gradient already) without running `backward`, so no copy is made.
    fn passes_dout_through(&self) -> bool {
        false
    }

    /// For the node `backward` starts from (dout = 1): fills `dinputs` (the slots `backward` would get) with
    /// gradients the forward already computed and returns true, or returns false to run `backward` as usual.
    fn root_grads(&self, dinputs: &mut [Option<Tensor>]) -> Result<bool> {
        let _ = dinputs;
        Ok(false)
    }

    /// True when `backward` reads an f32 device `dout` only through its bf16 copy (the bf16 mode's GEMMs) and
    /// takes a bf16 `dout` as it is: a pass-through node may then hand this op's output the bf16 copy instead of
    /// an f32 one (the residual add: a cast instead of a copy and a cast).
    fn reads_dout_as_bf16(&self) -> bool {
        false
    }

    /// True when `backward` takes an f32 device `dout` for its bf16 output and rounds only its own dinputs (rope):
    /// the tape then gives that output an f32 gradient, so its readers (attention) write it without rounding and
    /// no cast runs in between.
    fn reads_f32_dout(&self) -> bool {
        false
    }

    /// The bf16 rounding of input i's gradient that this op's backward (or `root_grads`) wrote beside it, where the
    /// tape asked for one when the op was recorded (`Tape::wants_bf16_twin`); taken once.
    #[cfg(feature = "cuda")]
    fn take_bf16_twin(&self, i: usize) -> Option<crate::gpu::Bf16Buf> {
        let _ = i;
        None
    }
}
