//! fake_quant: EfficientQAT's asymmetric uniform weight quantizer (`quantize/quantizer.py`,
//! `UniformAffineQuantizer.fake_quant`), forward and backward, with min-max initialisation.
//!
//! Shapes: w [N, K], scales and zeros [N, K/g] (row-major, group j of row n covers w[n, j·g..(j+1)·g]; this is
//! the official `x.reshape(-1, group_size)` order). Both scales and zeros are trainable floats.
//!
//! Forward, per group with raw parameters (s_p, z_p), qmax = 2^wbits − 1, round = round half to even:
//!   s  = clamp(s_p, 1e-4, 1e4)              official `clamp_ste`: value clamped, gradient passed unchanged
//!   zr = clamp(round(z_p), 0, qmax)         `clamp_ste(round_ste(..))`: both straight-through
//!   x  = w / s;  p = round(x) + zr          `round_ste`: gradient of round is 1
//!   q  = clamp(p, 0, qmax)                  plain `torch.clamp`: gradient 1 where 0 <= p <= qmax, else 0
//!   ŵ  = (q − zr) · s
//! Let m = [0 <= p <= qmax] (inclusive, as torch's clamp backward) and g = dL/dŵ. The chain rule through the
//! straight-through graph gives, per element (the 1/s and s of dW cancel):
//!   dW = g · m
//!   ds = g · (q − zr) + g · s · m · (−w/s²) = g · (q − zr − m · x)
//!   dz = g · (−s) + g · s · m              = −g · s · (1 − m)
//! and, since both clamps on the parameters are straight-through, per group:
//!   dscales[n, j] = Σ_group g · (q − zr − m · x)      (in range: g · (round(x) − x); clamped: g · (q − zr))
//!   dzeros[n, j]  = −s · Σ_{clamped elements} g       (0 when no element of the group clamps)
//! The gradient reaches s_p and z_p even where their own clamps bite (s_p < 1e-4, round(z_p) > qmax).
//!
//! Min-max init (official `__init__`): per group xmin = min(w), xmax = max(w) (not widened to include 0),
//! s = clamp((xmax − xmin)/qmax, 1e-4, 1e4), z = round(−clamp(xmin/s, −1e4, 1e4)). z is not clamped to
//! [0, qmax] at init (a group of all-positive weights gets z < 0); the forward clamps it.
//!
//! The `_cpu` kernels compute in f32 in the official order (w / s, round, + zr, clamp, − zr, · s), so their values
//! equal torch's fp32 ones; the `_ref` twins are f64 loops. Gradients follow the tape rule: `=` into fresh buffers.
use crate::autograd::{Backward, Tape, Var};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use rayon::prelude::*;
use wide::{f32x8, CmpGe, CmpLe};

#[cfg(feature = "cuda")]
mod cuda;
mod linear;
#[cfg(test)]
mod tests;

pub use linear::{fake_quant_linear, fake_quant_linear_bf16_out};

#[cfg(feature = "cuda")]
pub use cuda::{
    fake_quant_bwd_cuda, fake_quant_fwd_bf16_cuda, fake_quant_fwd_cuda, group_threads,
    init_minmax_cuda, FakeQuantDout, CUDA,
};

/// Bounds of the scale clamp (official `CLIPMIN` and its 1e4 ceiling), applied in the forward and at init.
pub const SCALE_MIN: f32 = 1e-4;
pub const SCALE_MAX: f32 = 1e4;
/// `group_size` value meaning one group per row (per-channel), as `-1` in GPTQ's quantize_config.json.
pub const PER_CHANNEL: i64 = -1;

/// Bits per weight and quantization group length along K.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantConfig {
    pub wbits: u32,
    /// A positive group length, or [`PER_CHANNEL`] (-1) for one group per row.
    pub group_size: i64,
}

impl QuantConfig {
    /// Checks wbits in 2..=8 and group_size positive or -1. Whether the group divides K is checked where K is known.
    pub fn new(wbits: u32, group_size: i64) -> Result<QuantConfig> {
        let cfg = QuantConfig { wbits, group_size };
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<()> {
        if !(2..=8).contains(&self.wbits) {
            return Err(Error::invalid(
                "fake_quant",
                format!("wbits {} outside 2..=8", self.wbits),
            ));
        }
        if self.group_size != PER_CHANNEL && self.group_size <= 0 {
            return Err(Error::invalid(
                "fake_quant",
                format!(
                    "group_size {} must be positive or -1 (per-channel)",
                    self.group_size
                ),
            ));
        }
        Ok(())
    }

    /// The largest integer level, 2^wbits − 1.
    pub fn qmax(&self) -> f32 {
        ((1u32 << self.wbits) - 1) as f32
    }

    /// The group length for rows of `k` in_features: `k` itself for per-channel; errors when it does not divide k.
    pub fn group_len(&self, k: usize) -> Result<usize> {
        self.check()?;
        let g = if self.group_size == PER_CHANNEL {
            k
        } else {
            self.group_size as usize
        };
        if k == 0 || !k.is_multiple_of(g) {
            return Err(Error::invalid(
                "fake_quant",
                format!("group_size {g} does not divide in_features {k}"),
            ));
        }
        Ok(g)
    }

    /// Checks that `w_shape` is [N, K] with a dividing group and returns (N, K, group length).
    pub(crate) fn dims(&self, w_shape: &[usize]) -> Result<(usize, usize, usize)> {
        let &[n, k] = w_shape else {
            return Err(Error::shape(
                "fake_quant",
                format!("weight {w_shape:?} must be 2-D [N, K]"),
            ));
        };
        Ok((n, k, self.group_len(k)?))
    }
}

/// Per-group min-max scales and zeros for `w` [N, K] (see the header): returns (scales, zeros), each [N, K/g].
/// Errors on a non-finite weight, naming its row and group. A device weight gets device scales and zeros.
pub fn init_minmax(w: &Tensor, cfg: QuantConfig) -> Result<(Tensor, Tensor)> {
    let (n, k, g) = cfg.dims(w.shape())?;
    let qmax = cfg.qmax();
    #[cfg(feature = "cuda")]
    if w.is_cuda() {
        return init_minmax_cuda(w.gpu("init_minmax")?, n, k, g, qmax);
    }
    let ng = k / g;
    let mut params = vec![(0.0f32, 0.0f32); n * ng];
    let w = w.f32s("init_minmax")?;
    params
        .par_chunks_mut(ng)
        .zip(w.par_chunks(k))
        .enumerate()
        .try_for_each(|(row, (p, w))| {
            for (j, (p, w)) in p.iter_mut().zip(w.chunks_exact(g)).enumerate() {
                if w.iter().any(|v| !v.is_finite()) {
                    return Err(Error::NonFinite {
                        what: format!("init_minmax weight row {row} group {j}"),
                    });
                }
                let xmin = w.iter().copied().fold(f32::INFINITY, f32::min);
                let xmax = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let s = ((xmax - xmin) / qmax).clamp(SCALE_MIN, SCALE_MAX);
                *p = (s, (-(xmin / s).clamp(-1e4, 1e4)).round_ties_even());
            }
            Ok(())
        })?;
    let (scales, zeros) = params.into_iter().unzip();
    Ok((
        Tensor::from_vec(&[n, ng], scales)?,
        Tensor::from_vec(&[n, ng], zeros)?,
    ))
}

pub fn fake_quant_fwd_ref(
    out: &mut [f64],
    w: &[f64],
    scales: &[f64],
    zeros: &[f64],
    g: usize,
    qmax: f64,
) {
    for (i, o) in out.iter_mut().enumerate() {
        let s = scales[i / g].clamp(SCALE_MIN as f64, SCALE_MAX as f64);
        let zr = zeros[i / g].round_ties_even().clamp(0.0, qmax);
        let q = (w[i] / s).round_ties_even() + zr;
        *o = (q.clamp(0.0, qmax) - zr) * s;
    }
}

/// dw, ds, dz as in the header (written, not accumulated). Groups are contiguous runs of `g` elements.
#[allow(clippy::too_many_arguments)]
pub fn fake_quant_bwd_ref(
    dw: &mut [f64],
    ds: &mut [f64],
    dz: &mut [f64],
    dout: &[f64],
    w: &[f64],
    scales: &[f64],
    zeros: &[f64],
    g: usize,
    qmax: f64,
) {
    ds.fill(0.0);
    dz.fill(0.0);
    for i in 0..w.len() {
        let j = i / g;
        let s = scales[j].clamp(SCALE_MIN as f64, SCALE_MAX as f64);
        let zr = zeros[j].round_ties_even().clamp(0.0, qmax);
        let x = w[i] / s;
        let p = x.round_ties_even() + zr;
        let m = if (0.0..=qmax).contains(&p) { 1.0 } else { 0.0 };
        let q = p.clamp(0.0, qmax);
        dw[i] = dout[i] * m;
        ds[j] += dout[i] * (q - zr - m * x);
        dz[j] += -dout[i] * s * (1.0 - m);
    }
}

const LANES: usize = 8;

fn lanes(s: &[f32]) -> f32x8 {
    f32x8::from(<[f32; LANES]>::try_from(s).expect("8 lanes"))
}

/// The clamped scale and the rounded, clamped zero of one group.
pub fn group_params(scale: f32, zero: f32, qmax: f32) -> (f32, f32) {
    (
        scale.clamp(SCALE_MIN, SCALE_MAX),
        zero.round_ties_even().clamp(0.0, qmax),
    )
}

/// The integer level q = clamp(round(w / s) + zr, 0, qmax) of one weight, for its group's (s, zr) from
/// [`group_params`]; the forward's scalar path and the real-quant packer both take q from here.
pub fn quant_level(w: f32, s: f32, zr: f32, qmax: f32) -> f32 {
    ((w / s).round_ties_even() + zr).clamp(0.0, qmax)
}

/// out = fake-quantized w; w and out [N, K], scales and zeros [N, K/g]. Rows in parallel, 8 lanes per group.
pub fn fake_quant_fwd_cpu(
    out: &mut [f32],
    w: &[f32],
    scales: &[f32],
    zeros: &[f32],
    g: usize,
    qmax: f32,
) {
    // Chunks of whole groups: a group's scale and zero stay scalars, split over rayon by the group.
    out.par_chunks_mut(g)
        .zip(w.par_chunks(g))
        .zip(scales.par_iter().zip(zeros.par_iter()))
        .with_min_len(64)
        .for_each(|((o, w), (&scale, &zero))| {
            let (s, zr) = group_params(scale, zero, qmax);
            let n8 = g / LANES * LANES;
            let (sv, zv, qv) = (f32x8::splat(s), f32x8::splat(zr), f32x8::splat(qmax));
            for (o, w) in o[..n8]
                .chunks_exact_mut(LANES)
                .zip(w[..n8].chunks_exact(LANES))
            {
                // wide's round is round-to-nearest-even (cvtps2dq / roundps), as torch.round.
                let p = (lanes(w) / sv).round() + zv;
                let r = (p.max(f32x8::ZERO).min(qv) - zv) * sv;
                o.copy_from_slice(r.as_array_ref());
            }
            for (o, &w) in o[n8..].iter_mut().zip(&w[n8..]) {
                *o = (quant_level(w, s, zr, qmax) - zr) * s;
            }
        });
}

/// One group's backward: writes dW when asked, returns (dscale, dzero).
fn group_bwd(
    dw: Option<&mut [f32]>,
    dout: &[f32],
    w: &[f32],
    s: f32,
    zr: f32,
    qmax: f32,
) -> (f32, f32) {
    let n8 = w.len() / LANES * LANES;
    let (sv, zv, qv) = (f32x8::splat(s), f32x8::splat(zr), f32x8::splat(qmax));
    let (mut ds8, mut dz8) = (f32x8::ZERO, f32x8::ZERO);
    let mut dw = dw;
    for c in 0..n8 / LANES {
        let r = c * LANES..(c + 1) * LANES;
        let (gv, x) = (lanes(&dout[r.clone()]), lanes(&w[r.clone()]) / sv);
        let p = x.round() + zv;
        let in_range = p.cmp_ge(f32x8::ZERO) & p.cmp_le(qv);
        let q = p.max(f32x8::ZERO).min(qv);
        // (q - zr - m·x): in range q - zr == round(x), so this is the rounding error round(x) - x.
        ds8 += gv * (q - zv - in_range.blend(x, f32x8::ZERO));
        dz8 += in_range.blend(f32x8::ZERO, gv);
        if let Some(d) = dw.as_deref_mut() {
            d[r].copy_from_slice(in_range.blend(gv, f32x8::ZERO).as_array_ref());
        }
    }
    let (mut ds, mut dz_sum) = (ds8.reduce_add(), dz8.reduce_add());
    for i in n8..w.len() {
        let x = w[i] / s;
        let p = x.round_ties_even() + zr;
        let m = (0.0..=qmax).contains(&p);
        ds += dout[i] * (p.clamp(0.0, qmax) - zr - if m { x } else { 0.0 });
        if !m {
            dz_sum += dout[i];
        }
        if let Some(d) = dw.as_deref_mut() {
            d[i] = if m { dout[i] } else { 0.0 };
        }
    }
    (ds, -s * dz_sum)
}

/// The f32 backward: each of dw [N, K], ds and dz [N, K/g] is written when given (inputs that need no
/// gradient pass None). Groups in parallel.
#[allow(clippy::too_many_arguments)]
pub fn fake_quant_bwd_cpu(
    dw: Option<&mut [f32]>,
    ds: Option<&mut [f32]>,
    dz: Option<&mut [f32]>,
    dout: &[f32],
    w: &[f32],
    scales: &[f32],
    zeros: &[f32],
    g: usize,
    qmax: f32,
) {
    let n_groups = scales.len();
    // Per-group optional output slots, so that rayon can hand each group its own pieces.
    let dw_groups: Vec<Option<&mut [f32]>> = match dw {
        Some(d) => d.chunks_mut(g).map(Some).collect(),
        None => (0..n_groups).map(|_| None).collect(),
    };
    let (ds, dz): (Vec<Option<&mut f32>>, Vec<Option<&mut f32>>) = (
        match ds {
            Some(d) => d.iter_mut().map(Some).collect(),
            None => (0..n_groups).map(|_| None).collect(),
        },
        match dz {
            Some(d) => d.iter_mut().map(Some).collect(),
            None => (0..n_groups).map(|_| None).collect(),
        },
    );
    dw_groups
        .into_par_iter()
        .zip(ds.into_par_iter().zip(dz.into_par_iter()))
        .zip(dout.par_chunks(g).zip(w.par_chunks(g)))
        .zip(scales.par_iter().zip(zeros.par_iter()))
        .with_min_len(64)
        .for_each(|(((dw, (ds, dz)), (dout, w)), (&scale, &zero))| {
            let (s, zr) = group_params(scale, zero, qmax);
            let (dsv, dzv) = group_bwd(dw, dout, w, s, zr, qmax);
            if let Some(ds) = ds {
                *ds = dsv;
            }
            if let Some(dz) = dz {
                *dz = dzv;
            }
        });
}

/// Fake-quantizes w [N, K] with scales and zeros [N, K/g]; gradients reach all three (see the header).
pub fn fake_quant(
    tape: &mut Tape,
    w: Var,
    scales: Var,
    zeros: Var,
    cfg: QuantConfig,
) -> Result<Var> {
    let ws = tape.value(w).shape().to_vec();
    let (n, k, g) = cfg.dims(&ws)?;
    for (name, v) in [("scales", scales), ("zeros", zeros)] {
        let shape = tape.value(v).shape();
        if shape != [n, k / g] {
            return Err(Error::shape(
                "fake_quant",
                format!(
                    "{name} {shape:?} must be [{n}, {}] for weight {ws:?} with group {g}",
                    k / g
                ),
            ));
        }
    }
    let qmax = cfg.qmax();
    #[cfg(feature = "cuda")]
    if let Some(ctx) = crate::gpu::device_of(
        "fake_quant",
        &[tape.value(w), tape.value(scales), tape.value(zeros)],
    )? {
        let op = "fake_quant";
        let values = [tape.value(w), tape.value(scales), tape.value(zeros)];
        let mut out = ctx.alloc(n * k)?;
        fake_quant_fwd_cuda(
            &mut out,
            values[0].gpu(op)?,
            values[1].gpu(op)?,
            values[2].gpu(op)?,
            g,
            qmax,
        )?;
        return Ok(tape.push_op(
            Tensor::from_gpu(&ws, out)?,
            &[w, scales, zeros],
            Box::new(FakeQuantBackward { g, qmax }),
        ));
    }
    let mut out = tape.alloc(&ws);
    fake_quant_fwd_cpu(
        out.f32s_mut("fake_quant")?,
        tape.value(w).f32s("fake_quant")?,
        tape.value(scales).f32s("fake_quant")?,
        tape.value(zeros).f32s("fake_quant")?,
        g,
        qmax,
    );
    Ok(tape.push_op(
        out,
        &[w, scales, zeros],
        Box::new(FakeQuantBackward { g, qmax }),
    ))
}

struct FakeQuantBackward {
    g: usize,
    qmax: f32,
}

impl Backward for FakeQuantBackward {
    fn name(&self) -> &'static str {
        "fake_quant"
    }
    /// Every kernel and GEMM of this backward writes each element of the gradients it is given.
    fn overwrites_dinputs(&self) -> bool {
        true
    }
    fn backward(
        &self,
        x: &[&Tensor],
        _: &Tensor,
        dout: &Tensor,
        d: &mut [Option<Tensor>],
    ) -> Result<()> {
        let op = "fake_quant_bwd";
        let [dw, ds, dz] = d else {
            return Err(Error::Autograd(format!(
                "{op}: expected 3 inputs, got {}",
                d.len()
            )));
        };
        #[cfg(feature = "cuda")]
        if dout.is_cuda() {
            return fake_quant_bwd_cuda(
                dw.as_mut().map(|t| t.gpu_mut(op)).transpose()?,
                ds.as_mut().map(|t| t.gpu_mut(op)).transpose()?,
                dz.as_mut().map(|t| t.gpu_mut(op)).transpose()?,
                dout.gpu(op)?,
                x[0].gpu(op)?,
                x[1].gpu(op)?,
                x[2].gpu(op)?,
                self.g,
                self.qmax,
            );
        }
        fake_quant_bwd_cpu(
            dw.as_mut().map(|t| t.f32s_mut(op)).transpose()?,
            ds.as_mut().map(|t| t.f32s_mut(op)).transpose()?,
            dz.as_mut().map(|t| t.f32s_mut(op)).transpose()?,
            dout.f32s(op)?,
            x[0].f32s(op)?,
            x[1].f32s(op)?,
            x[2].f32s(op)?,
            self.g,
            self.qmax,
        );
        Ok(())
    }
}
