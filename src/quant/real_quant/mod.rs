//! real_quant: a quantized linear layer held as packed integers (E2E-QP's `QuantLinear`, formats.md §1.2), its
//! exact dequantization, the E2E-QP op that trains only the scales ([`linear`]), and GPTQ tensors ([`gptq`]).
//!
//! Layout of [`QuantizedLinear`] (our internal form, chosen so that dequantizing row n of Ŵ [out, in] reads one
//! contiguous run of words, one scale row and one zero row):
//! - `qweight` [out, ⌈in/p⌉] u32: row n is the stream w_int[n, 0..in] in [`PackLayout::EqatTenPerWord`] order
//!   (p = 32/b values per word, 10 at 3 bits), so any in_features packs.
//! - `zeros` [out, groups] u8 and `scales` [out, groups] f32: the fake-quant layout (`scales[n, j]` covers
//!   w[n, j·g..(j+1)·g]), so Block-AP's result and E2E-QP's trainable scales need no transpose. GPTQ's
//!   [groups, out] appears only in [`gptq`].
//!
//! Dequantization: ŵ[n, k] = (q[n, k] − z[n, k/g]) · s[n, k/g] in f32, the fake-quant forward's exact operations,
//! so [`QuantizedLinear::dequantize`] equals `fake_quant`'s Ŵ bit for bit.
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gptq;
pub mod linear;

#[cfg(test)]
mod tests;

use crate::error::{Error, Result};
use crate::quant::fake_quant::{group_params, quant_level, QuantConfig};
use crate::quant::pack::{check_bits, pack_cols, unpack_cols, unpack_stream_f32, PackLayout};
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::sync::Arc;

/// The internal qweight layout (see the module docs).
pub(crate) const INTERNAL_LAYOUT: PackLayout = PackLayout::EqatTenPerWord;

/// A linear layer W [out, in] quantized to `wbits` with one (scale, zero) per group of `group_size` inputs.
/// Everything is shared (`Arc`), so clones (the tape's saved state) copy nothing.
#[derive(Clone, Debug)]
pub struct QuantizedLinear {
    wbits: u32,
    group_size: usize,
    in_features: usize,
    out_features: usize,
    qweight: Arc<[u32]>,
    zeros: Arc<[u8]>,
    scales: Arc<Tensor>,
    /// `qweight` and `zeros` on a GPU once a device op asked for them (`cuda::DevicePacked`), shared by clones.
    #[cfg(feature = "cuda")]
    device: Arc<std::sync::Mutex<Option<Arc<cuda::DevicePacked>>>>,
}

impl QuantizedLinear {
    /// Quantizes the fake-quant result of Block-AP: w [N, K], raw scales and zeros [N, K/g] as trained. Each
    /// group's (s, zr) and each weight's level come from fake_quant's own functions, so q = clamp(round(w/s) +
    /// clamp(round(z), 0, qmax), 0, qmax) and the stored scale is the clamped s of the forward.
    pub fn from_fake_quant(
        w: &Tensor,
        scales: &Tensor,
        zeros: &Tensor,
        cfg: QuantConfig,
    ) -> Result<QuantizedLinear> {
        let &[n, k] = w.shape() else {
            return Err(Error::shape(
                "real_quant",
                format!("weight {:?} must be 2-D [out, in]", w.shape()),
            ));
        };
        let g = cfg.group_len(k)?;
        check_bits(cfg.wbits, "real_quant")?;
        for (name, t) in [("scales", scales), ("zeros", zeros)] {
            if t.shape() != [n, k / g] {
                return Err(Error::shape(
                    "real_quant",
                    format!(
                        "{name} {:?} must be [{n}, {}] for weight [{n}, {k}] with group {g}",
                        t.shape(),
                        k / g
                    ),
                ));
            }
        }
        let qmax = cfg.qmax();
        let (w, sp, zp) = (
            w.f32s("real_quant")?,
            scales.f32s("real_quant")?,
            zeros.f32s("real_quant")?,
        );
        let ng = k / g;
        let mut ints = vec![0u32; n * k];
        let mut params = vec![(0.0f32, 0u32); n * ng];
        ints.par_chunks_mut(g)
            .zip(params.par_iter_mut())
            .zip(w.par_chunks(g).zip(sp.par_iter().zip(zp.par_iter())))
            .enumerate()
            .try_for_each(|(i, ((q, p), (w, (&scale, &zero))))| {
                if !scale.is_finite() || !zero.is_finite() || w.iter().any(|v| !v.is_finite()) {
                    return Err(Error::NonFinite {
                        what: format!(
                            "real_quant weight, scale or zero of row {} group {}",
                            i / ng,
                            i % ng
                        ),
                    });
                }
                let (s, zr) = group_params(scale, zero, qmax);
                for (q, &w) in q.iter_mut().zip(w) {
                    *q = quant_level(w, s, zr, qmax) as u32;
                }
                *p = (s, zr as u32);
                Ok(())
            })?;
        let (s, z): (Vec<f32>, Vec<u32>) = params.into_iter().unzip();
        QuantizedLinear::from_ints(
            cfg.wbits,
            g,
            k,
            n,
            &ints,
            &z,
            Tensor::from_vec(&[n, ng], s)?,
        )
    }

    /// Builds the layer from integer weights `w_int` [out, in] and `zeros` [out, groups] (each ≤ 2^wbits − 1)
    /// and `scales` [out, groups] (finite). `group_size` must divide `in_features` (≥ 1).
    pub fn from_ints(
        wbits: u32,
        group_size: usize,
        in_features: usize,
        out_features: usize,
        w_int: &[u32],
        zeros: &[u32],
        scales: Tensor,
    ) -> Result<QuantizedLinear> {
        check_bits(wbits, "real_quant")?;
        if group_size == 0 || in_features == 0 || !in_features.is_multiple_of(group_size) {
            return Err(Error::invalid(
                "real_quant",
                format!("group_size {group_size} must divide in_features {in_features} (both ≥ 1)"),
            ));
        }
        let ng = in_features / group_size;
        let qmax = (1u32 << wbits) - 1;
        if zeros.len() != out_features * ng {
            return Err(Error::shape(
                "real_quant",
                format!(
                    "zeros has {} values, need [{out_features}, {ng}]",
                    zeros.len()
                ),
            ));
        }
        if let Some(i) = zeros.iter().position(|&z| z > qmax) {
            return Err(Error::invalid(
                "real_quant",
                format!(
                    "zero point {} at [{}, {}] exceeds the {wbits}-bit maximum {qmax}",
                    zeros[i],
                    i / ng,
                    i % ng
                ),
            ));
        }
        let qweight = pack_cols(
            wbits,
            INTERNAL_LAYOUT,
            w_int,
            out_features,
            in_features,
            "real_quant qweight",
        )?;
        let mut layer = QuantizedLinear {
            wbits,
            group_size,
            in_features,
            out_features,
            qweight: qweight.into(),
            zeros: zeros.iter().map(|&z| z as u8).collect(),
            scales: Arc::new(Tensor::zeros(&[out_features, ng])),
            #[cfg(feature = "cuda")]
            device: Arc::default(),
        };
        layer.set_scales(scales)?;
        Ok(layer)
    }

    pub fn wbits(&self) -> u32 {
        self.wbits
    }
    pub fn group_size(&self) -> usize {
        self.group_size
    }
    pub fn in_features(&self) -> usize {
        self.in_features
    }
    pub fn out_features(&self) -> usize {
        self.out_features
    }
    pub fn groups(&self) -> usize {
        self.in_features / self.group_size
    }
    /// The packed integers, [out, ⌈in/p⌉] (module docs).
    pub fn qweight(&self) -> &[u32] {
        &self.qweight
    }
    /// Zero points [out, groups].
    pub fn zeros(&self) -> &[u8] {
        &self.zeros
    }
    /// Scales [out, groups], f32.
    pub fn scales(&self) -> &Tensor {
        &self.scales
    }

    /// Drops this layer's scales, leaving an empty [0] tensor: for a model whose scales an E2E-QP trainer already
    /// copied to where it trains, so that the device holds them once. Everything that reads the scales (host
    /// dequantization, export) errors until [`QuantizedLinear::set_scales`] puts trained ones back.
    pub fn clear_scales(&mut self) {
        self.scales = Arc::new(Tensor::zeros(&[0]));
    }

    /// Replaces the scales (after E2E-QP trained them); errors on a shape other than [out, groups] or a
    /// non-finite value.
    pub fn set_scales(&mut self, scales: Tensor) -> Result<()> {
        let want = [self.out_features, self.groups()];
        if scales.shape() != want {
            return Err(Error::shape(
                "real_quant",
                format!(
                    "scales {:?} must be [out, groups] = {want:?}",
                    scales.shape()
                ),
            ));
        }
        let scales = scales.to_dtype(crate::tensor::DType::F32);
        if let Some(i) = scales
            .f32s("real_quant")?
            .iter()
            .position(|s| !s.is_finite())
        {
            return Err(Error::NonFinite {
                what: format!("real_quant scales [{}, {}]", i / want[1], i % want[1]),
            });
        }
        self.scales = Arc::new(scales);
        Ok(())
    }

    /// Errors for a layer whose packed integers exist only on a GPU (`cuda::QuantizedLinear::on_device`).
    fn check_host(&self) -> Result<()> {
        if self.qweight.is_empty() && self.out_features * self.in_features > 0 {
            return Err(Error::invalid(
                "real_quant",
                format!(
                    "layer [{}, {}]: its packed integers live only on a GPU",
                    self.out_features, self.in_features
                ),
            ));
        }
        Ok(())
    }

    /// The integer weights [out, in].
    pub fn int_weights(&self) -> Result<Vec<u32>> {
        self.check_host()?;
        unpack_cols(
            self.wbits,
            INTERNAL_LAYOUT,
            &self.qweight,
            self.out_features,
            self.in_features,
            "real_quant qweight",
        )
    }

    /// Ŵ [out, in] with the stored scales.
    pub fn dequantize(&self) -> Result<Tensor> {
        let mut out = vec![0.0; self.out_features * self.in_features];
        self.dequantize_into(self.scales.f32s("real_quant")?, &mut out)?;
        Tensor::from_vec(&[self.out_features, self.in_features], out)
    }

    /// out [out, in] = (q − z) · scales, with `scales` [out, groups] given (the trainable copy in E2E-QP).
    /// Rows in parallel; each decodes its words into the output row, then shifts and scales it group by group.
    pub fn dequantize_into(&self, scales: &[f32], out: &mut [f32]) -> Result<()> {
        self.check_host()?;
        let (k, ng) = (self.in_features, self.groups());
        if scales.len() != self.out_features * ng || out.len() != self.out_features * k {
            return Err(Error::shape(
                "real_quant",
                format!(
                    "dequantize: scales {} and out {} values for [out {}, in {k}, groups {ng}]",
                    scales.len(),
                    out.len(),
                    self.out_features
                ),
            ));
        }
        let wpr = self.qweight.len() / self.out_features.max(1);
        out.par_chunks_mut(k)
            .zip(self.qweight.par_chunks(wpr.max(1)))
            .zip(scales.par_chunks(ng).zip(self.zeros.par_chunks(ng)))
            .try_for_each(|((o, words), (s, z))| {
                unpack_stream_f32(self.wbits, INTERNAL_LAYOUT, words, o)?;
                for ((o, &s), &z) in o.chunks_mut(self.group_size).zip(s).zip(z) {
                    let z = z as f32;
                    o.iter_mut().for_each(|v| *v = (*v - z) * s);
                }
                Ok(())
            })
    }
}
