//! E2E-QP's real-quant linear on the GPU (`cuda/real_quant.cu`): the packed integers and zero points of a layer
//! are uploaded once and kept beside the layer ([`QuantizedLinear::device_packed`]), both as packed words (the
//! zero points at `wbits` bits too: 1/16 of f32 at 2 bits); each call dequantizes Ŵ into a scratch [N, K] from
//! the caching allocator (dropped at return, so the next layer of that shape gets the same memory back: no
//! cuMemAlloc after the first step) and runs cuBLAS on it. The backward dequantizes again for dx, then takes an
//! f32 scratch for dW = doutᵀ·x, from which the dscales kernel sums each group's dW·(q − z).
//! The formulas are in linear.rs's header.
//!
//! In the context's bf16 mode (`GpuContext::set_matmul_bf16`) the products take bf16-rounded operands with f32
//! accumulation (as `ops::linear` does there); Ŵ is dequantized straight into bf16 (the f32 value rounded, as a
//! cast of the f32 Ŵ would give, so no f32 copy of Ŵ exists) and dscales is summed in f32.
//! A layer made by [`QuantizedLinear::on_device`] (synthetic benchmark weights) has no host copy of its integers.
use super::QuantizedLinear;
use super::INTERNAL_LAYOUT;
use crate::error::{Error, Result};
use crate::gpu::{Arg, Bf16Buf, GpuBuf, GpuContext, KernelSource};
use crate::ops::linear::cast_bf16_cuda;
use crate::quant::pack::pack_cols;
use crate::tensor::Tensor;
use std::sync::Arc;

pub const CUDA: KernelSource = KernelSource {
    op: "real_quant",
    code: include_str!("../../../cuda/real_quant.cu"),
};

/// One layer's packed integers (`qweight`'s u32 bits) and packed zero points (`qzeros` [out, ⌈groups/p⌉] words,
/// each row's zero points in the layout of a `qweight` row) on one GPU.
#[derive(Debug)]
pub struct DevicePacked {
    pub qweight: GpuBuf,
    pub qzeros: GpuBuf,
}

impl QuantizedLinear {
    /// A layer whose packed integers and zeros exist only on the GPU of `packed` (`qweight` [out, ⌈in/p⌉] and
    /// `qzeros` [out, ⌈groups/p⌉] words in the internal layout) with `scales` [out, groups] on that GPU:
    /// synthetic weights generated there, never on the host. Host-side methods (`int_weights`, `dequantize`)
    /// error for it.
    pub fn on_device(
        wbits: u32,
        group_size: usize,
        in_features: usize,
        out_features: usize,
        packed: DevicePacked,
        scales: Tensor,
    ) -> Result<QuantizedLinear> {
        crate::quant::pack::check_bits(wbits, "real_quant")?;
        if group_size == 0 || in_features == 0 || !in_features.is_multiple_of(group_size) {
            return Err(Error::invalid(
                "real_quant",
                format!("group_size {group_size} must divide in_features {in_features} (both ≥ 1)"),
            ));
        }
        let ng = in_features / group_size;
        let wpr = in_features.div_ceil(32 / wbits as usize);
        check_len("qweight", packed.qweight.len(), out_features * wpr)?;
        check_len(
            "qzeros",
            packed.qzeros.len(),
            out_features * ng.div_ceil(32 / wbits as usize),
        )?;
        if scales.shape() != [out_features, ng] || !scales.is_cuda() {
            return Err(Error::shape(
                "real_quant_cuda",
                format!(
                    "scales {:?} on {} must be [{out_features}, {ng}] on the GPU",
                    scales.shape(),
                    scales.device_name()
                ),
            ));
        }
        Ok(QuantizedLinear {
            wbits,
            group_size,
            in_features,
            out_features,
            qweight: Arc::from(Vec::new()),
            zeros: Arc::from(Vec::new()),
            scales: Arc::new(scales),
            device: Arc::new(std::sync::Mutex::new(Some(Arc::new(packed)))),
        })
    }

    /// The packed integers and zeros on `ctx`: uploaded on first use and kept, shared by every clone of the layer
    /// (a layer asked for on another GPU is uploaded there and kept instead).
    pub fn device_packed(&self, ctx: &Arc<GpuContext>) -> Result<Arc<DevicePacked>> {
        let mut slot = self.device.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = slot.as_ref() {
            if Arc::ptr_eq(p.qweight.ctx(), ctx) {
                return Ok(p.clone());
            }
        }
        self.check_host()?;
        let zeros: Vec<u32> = self.zeros.iter().map(|&z| z as u32).collect();
        let qzeros = pack_cols(
            self.wbits,
            INTERNAL_LAYOUT,
            &zeros,
            self.out_features,
            self.groups(),
            "real_quant qzeros",
        )?;
        let p = Arc::new(DevicePacked {
            qweight: ctx.upload_bits(&self.qweight)?,
            qzeros: ctx.upload_bits(&qzeros)?,
        });
        *slot = Some(p.clone());
        Ok(p)
    }

    /// Words per row of `qweight`: ⌈in / p⌉ with p = ⌊32 / wbits⌋ values per word.
    fn words_per_row(&self) -> usize {
        self.in_features.div_ceil(32 / self.wbits as usize)
    }

    /// Words per row of the packed zero points: ⌈groups / p⌉.
    fn zero_words_per_row(&self) -> usize {
        self.groups().div_ceil(32 / self.wbits as usize)
    }

    /// The kernels' trailing arguments: words per row of qweight and of qzeros, bits, group length.
    fn layout_args(&self) -> [Arg; 4] {
        [
            Arg::I64(self.words_per_row() as i64),
            Arg::I64(self.zero_words_per_row() as i64),
            Arg::I32(self.wbits() as i32),
            Arg::I64(self.group_size() as i64),
        ]
    }
}

/// Errors unless `len` values are `what` of `want` values.
fn check_len(what: &str, len: usize, want: usize) -> Result<()> {
    if len == want {
        return Ok(());
    }
    Err(Error::shape(
        "real_quant_cuda",
        format!("{what} has {len} values, need {want}"),
    ))
}

/// w [N, K] = (q − z) · scales, bit for bit `QuantizedLinear::dequantize_into`.
pub fn real_quant_dequant_cuda(
    w: &mut GpuBuf,
    qlin: &QuantizedLinear,
    packed: &DevicePacked,
    scales: &GpuBuf,
) -> Result<()> {
    let (n, k) = (qlin.out_features(), qlin.in_features());
    check_len("w", w.len(), n * k)?;
    dequant_launch(
        w.ctx(),
        ("real_quant_dequant_f32", n * k),
        w.arg(),
        qlin,
        packed,
        scales,
    )
}

/// Ŵ rounded to bf16: bit for bit `cast_bf16_cuda` of [`real_quant_dequant_cuda`]'s result.
pub fn real_quant_dequant_bf16_cuda(
    w: &mut Bf16Buf,
    qlin: &QuantizedLinear,
    packed: &DevicePacked,
    scales: &GpuBuf,
) -> Result<()> {
    let (n, k) = (qlin.out_features(), qlin.in_features());
    check_len("w", w.len(), n * k)?;
    // A packed word per thread.
    dequant_launch(
        w.ctx(),
        ("real_quant_dequant_bf16", n * qlin.words_per_row()),
        w.arg(),
        qlin,
        packed,
        scales,
    )
}

/// Launches `kernel` over `items` threads' worth of work.
fn dequant_launch(
    ctx: &Arc<GpuContext>,
    (kernel, items): (&'static str, usize),
    w: Arg,
    qlin: &QuantizedLinear,
    packed: &DevicePacked,
    scales: &GpuBuf,
) -> Result<()> {
    let (n, k) = (qlin.out_features(), qlin.in_features());
    check_len("scales", scales.len(), n * qlin.groups())?;
    let head = [
        w,
        packed.qweight.arg(),
        packed.qzeros.arg(),
        scales.arg(),
        Arg::I64(n as i64),
        Arg::I64(k as i64),
    ];
    let args: Vec<Arg> = head.into_iter().chain(qlin.layout_args()).collect();
    check_u32_index(n, k)?;
    ctx.launch_1d(&CUDA, kernel, items, &args)
}

/// The kernels index with 32 bits (cuda/real_quant.cu): N·K must stay below 2^32.
fn check_u32_index(n: usize, k: usize) -> Result<()> {
    match (n as u64) * (k as u64) < 1 << 32 {
        true => Ok(()),
        false => Err(Error::shape(
            "real_quant",
            format!("a [{n}, {k}] weight: the GPU kernels index at most 2^32 values"),
        )),
    }
}

/// dscales [N, K/g] = per-group Σ dw·(q − z) for dW [N, K], as `real_quant_dscales_cpu`.
pub fn real_quant_dscales_cuda(
    dscales: &mut GpuBuf,
    dw: &GpuBuf,
    qlin: &QuantizedLinear,
    packed: &DevicePacked,
) -> Result<()> {
    let (n, k) = (qlin.out_features(), qlin.in_features());
    let n_groups = n * qlin.groups();
    check_len("dW", dw.len(), n * k)?;
    check_len("dscales", dscales.len(), n_groups)?;
    check_u32_index(n, k)?;
    // Teams of 8 lanes per group where whole 8-value chunks line up (cuda/real_quant.cu), else a warp per group.
    let (kernel, threads) = match qlin.group_size().is_multiple_of(8) && k % 8 == 0 {
        true => ("real_quant_dscales_f32_teams", n_groups.div_ceil(4) * 32),
        false => ("real_quant_dscales_f32", n_groups * 32),
    };
    dscales.ctx().launch_1d(
        &CUDA,
        kernel,
        threads,
        &[
            dscales.arg(),
            dw.arg(),
            packed.qweight.arg(),
            packed.qzeros.arg(),
            Arg::I64(n_groups as i64),
            Arg::I64(k as i64),
        ]
        .into_iter()
        .chain(qlin.layout_args())
        .collect::<Vec<_>>(),
    )
}

/// out [R, N] = x [R, K] · Ŵᵀ, Ŵ dequantized from `qlin` with `scales` into a scratch buffer.
pub fn real_quant_linear_fwd_cuda(
    out: &mut GpuBuf,
    x: &GpuBuf,
    qlin: &QuantizedLinear,
    scales: &GpuBuf,
    rows: usize,
) -> Result<()> {
    let (k, n) = (qlin.in_features(), qlin.out_features());
    let ctx = x.ctx().clone();
    if ctx.matmul_bf16() {
        return real_quant_linear_fwd_bf16_cuda(out, &cast_bf16_cuda(x)?, qlin, scales, rows);
    }
    let packed = qlin.device_packed(&ctx)?;
    let mut w = ctx.alloc(n * k)?;
    real_quant_dequant_cuda(&mut w, qlin, &packed, scales)?;
    ctx.sgemm(false, true, rows, n, k, 1.0, x, &w, 0.0, out)
}

/// [`real_quant_linear_fwd_cuda`] in the bf16 mode from x's bf16 copy `xb` (the tape's, shared by the linears
/// that read the same x): Ŵ dequantized straight to bf16, one bf16 GEMM with f32 accumulation.
pub fn real_quant_linear_fwd_bf16_cuda(
    out: &mut GpuBuf,
    xb: &Bf16Buf,
    qlin: &QuantizedLinear,
    scales: &GpuBuf,
    rows: usize,
) -> Result<()> {
    let (k, n) = (qlin.in_features(), qlin.out_features());
    let ctx = out.ctx().clone();
    let packed = qlin.device_packed(&ctx)?;
    let mut wb = ctx.alloc_bf16(n * k)?;
    real_quant_dequant_bf16_cuda(&mut wb, qlin, &packed, scales)?;
    ctx.gemm_bf16(false, true, rows, n, k, 1.0, xb, &wb, 0.0, out)
}

/// Gradients of [`real_quant_linear_fwd_cuda`]; each `Some` buffer is overwritten. In the bf16 mode dout is cast
/// and the products run as [`real_quant_linear_bwd_bf16_cuda`]'s.
pub fn real_quant_linear_bwd_cuda(
    dx: Option<&mut GpuBuf>,
    dscales: Option<&mut GpuBuf>,
    dout: &GpuBuf,
    (x, xb): (&GpuBuf, Option<&Bf16Buf>),
    qlin: &QuantizedLinear,
    scales: &GpuBuf,
    rows: usize,
) -> Result<()> {
    let ctx = dout.ctx().clone();
    if ctx.matmul_bf16() {
        let doutb = cast_bf16_cuda(dout)?;
        return real_quant_linear_bwd_bf16_cuda(dx, dscales, &doutb, (x, xb), qlin, scales, rows);
    }
    let (k, n) = (qlin.in_features(), qlin.out_features());
    let packed = qlin.device_packed(&ctx)?;
    if let Some(dx) = dx {
        let mut w = ctx.alloc(n * k)?;
        real_quant_dequant_cuda(&mut w, qlin, &packed, scales)?;
        ctx.sgemm(false, false, rows, k, n, 1.0, dout, &w, 0.0, dx)?;
    }
    if let Some(ds) = dscales {
        let mut dw = ctx.alloc(n * k)?;
        ctx.sgemm(true, false, n, k, rows, 1.0, dout, x, 0.0, &mut dw)?;
        real_quant_dscales_cuda(ds, &dw, qlin, &packed)?;
    }
    Ok(())
}

/// The bf16 mode's gradients from dout's bf16 copy `doutb`: bf16 GEMMs with f32 accumulation; `xb`, when given,
/// is x's bf16 copy (the forward's), so x is not cast again.
pub fn real_quant_linear_bwd_bf16_cuda(
    dx: Option<&mut GpuBuf>,
    dscales: Option<&mut GpuBuf>,
    doutb: &Bf16Buf,
    (x, xb): (&GpuBuf, Option<&Bf16Buf>),
    qlin: &QuantizedLinear,
    scales: &GpuBuf,
    rows: usize,
) -> Result<()> {
    let (k, n) = (qlin.in_features(), qlin.out_features());
    let ctx = doutb.ctx().clone();
    let packed = qlin.device_packed(&ctx)?;
    if let Some(dx) = dx {
        let mut wb = ctx.alloc_bf16(n * k)?;
        real_quant_dequant_bf16_cuda(&mut wb, qlin, &packed, scales)?;
        ctx.gemm_bf16(false, false, rows, k, n, 1.0, doutb, &wb, 0.0, dx)?;
    }
    if let Some(ds) = dscales {
        let mut dw = ctx.alloc(n * k)?;
        let cast;
        let xb = match xb {
            Some(xb) => xb,
            None => {
                cast = cast_bf16_cuda(x)?;
                &cast
            }
        };
        ctx.gemm_bf16(true, false, n, k, rows, 1.0, doutb, xb, 0.0, &mut dw)?;
        real_quant_dscales_cuda(ds, &dw, qlin, &packed)?;
    }
    Ok(())
}
