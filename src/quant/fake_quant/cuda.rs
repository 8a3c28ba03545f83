//! The launches of `cuda/fake_quant.cu` (forward per element, backward one warp per group); the formulas are in
//! this module's parent header. Buffers: w, out, dw [N, K]; scales, zeros, ds, dz [N, K/g].
use crate::error::{Error, Result};
use crate::gpu::{opt_arg, Arg, Bf16Buf, GpuBuf, KernelSource};
use crate::tensor::Tensor;

pub const CUDA: KernelSource = KernelSource {
    op: "fake_quant",
    code: include_str!("../../../cuda/fake_quant.cu"),
};

pub fn fake_quant_fwd_cuda(
    out: &mut GpuBuf,
    w: &GpuBuf,
    scales: &GpuBuf,
    zeros: &GpuBuf,
    g: usize,
    qmax: f32,
) -> Result<()> {
    let n = out.len();
    out.ctx().launch_1d(
        &CUDA,
        "fake_quant_fwd_f32",
        n,
        &[
            out.arg(),
            w.arg(),
            scales.arg(),
            zeros.arg(),
            Arg::I64(n as i64),
            Arg::I64(g as i64),
            Arg::F32(qmax),
        ],
    )
}

/// Threads of a launch that gives every group its lanes (cuda/fake_quant.cu's group layout): a team of 8 per group
/// when g is a multiple of 64, else a warp.
pub fn group_threads(n_groups: usize, g: usize) -> usize {
    match g % 64 {
        0 => n_groups.div_ceil(4) * 32,
        _ => n_groups * 32,
    }
}

/// The dout a backward reads: f32, or bf16 (the bf16 mode's dŵ GEMM output, widened exactly in the kernel).
pub trait FakeQuantDout {
    /// The backward kernel for this dout type.
    const KERNEL: &'static str;
    fn arg(&self) -> Arg;
    /// How many values it holds.
    fn values(&self) -> usize;
}

impl FakeQuantDout for GpuBuf {
    const KERNEL: &'static str = "fake_quant_bwd_f32";
    fn arg(&self) -> Arg {
        GpuBuf::arg(self)
    }
    fn values(&self) -> usize {
        self.len()
    }
}

impl FakeQuantDout for Bf16Buf {
    const KERNEL: &'static str = "fake_quant_bwd_bf16";
    fn arg(&self) -> Arg {
        Bf16Buf::arg(self)
    }
    fn values(&self) -> usize {
        self.len()
    }
}

/// dw, ds, dz as `fake_quant_bwd_cpu` (each written when given), in cuda/fake_quant.cu's group layout.
#[allow(clippy::too_many_arguments)]
pub fn fake_quant_bwd_cuda<D: FakeQuantDout>(
    dw: Option<&mut GpuBuf>,
    ds: Option<&mut GpuBuf>,
    dz: Option<&mut GpuBuf>,
    dout: &D,
    w: &GpuBuf,
    scales: &GpuBuf,
    zeros: &GpuBuf,
    g: usize,
    qmax: f32,
) -> Result<()> {
    let grads = [grad_arg(&dw), grad_arg(&ds), grad_arg(&dz)];
    let dout = (D::KERNEL, dout.arg(), dout.values());
    launch_fake_quant_bwd(grads, dout, w, scales, zeros, g, qmax)
}

/// An optional gradient's kernel argument and length.
fn grad_arg(b: &Option<&mut GpuBuf>) -> (Arg, Option<usize>) {
    (opt_arg(b), b.as_ref().map(|b| b.len()))
}

/// One launch of the backward `kernel` with dout at `dout_arg` (`dout_len` values of its type) writing the given
/// (dw, ds, dz).
fn launch_fake_quant_bwd(
    grads: [(Arg, Option<usize>); 3],
    (kernel, dout_arg, dout_len): (&'static str, Arg, usize),
    w: &GpuBuf,
    scales: &GpuBuf,
    zeros: &GpuBuf,
    g: usize,
    qmax: f32,
) -> Result<()> {
    let n_groups = scales.len();
    let [(dw, dw_len), (ds, ds_len), (dz, dz_len)] = grads;
    let weights_ok = [Some(dout_len), dw_len]
        .iter()
        .flatten()
        .all(|&l| l == w.len());
    let groups_ok = [Some(zeros.len()), ds_len, dz_len]
        .iter()
        .flatten()
        .all(|&l| l == n_groups);
    if g == 0 || w.len() != n_groups * g || !weights_ok || !groups_ok {
        return Err(Error::shape(
            kernel,
            format!(
                "w of {} values with groups of {g}, dout of {dout_len}, scales {n_groups}, zeros {}, dw {dw_len:?}, \
                 ds {ds_len:?}, dz {dz_len:?}",
                w.len(),
                zeros.len()
            ),
        ));
    }
    w.ctx().launch_1d(
        &CUDA,
        kernel,
        group_threads(n_groups, g),
        &[
            dw,
            ds,
            dz,
            dout_arg,
            w.arg(),
            scales.arg(),
            zeros.arg(),
            Arg::I64(n_groups as i64),
            Arg::I64(g as i64),
            Arg::F32(qmax),
        ],
    )
}

/// `init_minmax` of a device weight [n, k] with groups of g: (scales, zeros) on the device, each [n, k/g].
/// Errors when a weight is not finite (one flag downloaded, so this waits for the stream).
pub fn init_minmax_cuda(
    w: &GpuBuf,
    n: usize,
    k: usize,
    g: usize,
    qmax: f32,
) -> Result<(Tensor, Tensor)> {
    let ctx = w.ctx().clone();
    let n_groups = n * (k / g);
    let (scales, zeros, bad) = (ctx.alloc(n_groups)?, ctx.alloc(n_groups)?, ctx.zeros(1)?);
    ctx.launch_1d(
        &CUDA,
        "fake_quant_init_minmax_f32",
        n_groups * 32,
        &[
            scales.arg(),
            zeros.arg(),
            bad.arg(),
            w.arg(),
            Arg::I64(n_groups as i64),
            Arg::I64(g as i64),
            Arg::F32(qmax),
        ],
    )?;
    if bad.to_vec()?[0] != 0.0 {
        return Err(Error::NonFinite {
            what: format!("init_minmax of a device weight [{n}, {k}]"),
        });
    }
    Ok((
        Tensor::from_gpu(&[n, k / g], scales)?,
        Tensor::from_gpu(&[n, k / g], zeros)?,
    ))
}

/// out = bf16(fake_quant(w)) for the bf16 GEMMs; w.len() must be a multiple of 4.
pub fn fake_quant_fwd_bf16_cuda(
    out: &mut Bf16Buf,
    w: &GpuBuf,
    scales: &GpuBuf,
    zeros: &GpuBuf,
    g: usize,
    qmax: f32,
) -> Result<()> {
    let n = w.len();
    if !n.is_multiple_of(4) || out.len() != n {
        return Err(Error::shape(
            "fake_quant_fwd_bf16",
            format!(
                "{n} weights into {} bf16 values: need equal lengths, a multiple of 4",
                out.len()
            ),
        ));
    }
    w.ctx().launch_1d(
        &CUDA,
        "fake_quant_fwd_bf16",
        n / 4,
        &[
            out.arg(),
            w.arg(),
            scales.arg(),
            zeros.arg(),
            Arg::I64(n as i64),
            Arg::I64(g as i64),
            Arg::F32(qmax),
        ],
    )
}
