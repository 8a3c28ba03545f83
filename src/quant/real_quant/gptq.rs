//! GPTQ tensors of one linear layer (formats.md §5.1) to and from a [`QuantizedLinear`]:
//! - `qweight` i32 [words(in), out]: each column n is the stream q[n, 0..in] packed along the input dim
//!   ([`pack_rows`]); words(in) = in·b/32 in the GPTQ layout, ⌈in/⌊32/b⌋⌉ in EQAT's.
//! - `qzeros` i32 [groups, words(out)]: each group row packed along the output dim, with the zero convention.
//! - `scales` f16 [groups, out]; `g_idx` i32 [in] = k / group_size (no desc_act permutation).
//!
//! The i32 words are the u32 words reinterpreted (two's complement), as torch stores them.
use super::QuantizedLinear;
use crate::error::{Error, Result};
use crate::quant::pack::{
    pack_qzeros, pack_rows, unpack_qzeros, unpack_rows, PackLayout, ZeroConvention,
};
use crate::tensor::{DType, Tensor};

/// The four tensors GPTQ loaders read for one linear layer.
#[derive(Clone, Debug)]
pub struct GptqTensors {
    pub qweight: Vec<i32>,
    pub qweight_shape: [usize; 2],
    pub qzeros: Vec<i32>,
    pub qzeros_shape: [usize; 2],
    /// f16 [groups, out].
    pub scales: Tensor,
    pub g_idx: Vec<i32>,
}

/// Row-major transpose of `a` [rows, cols].
fn transpose<T: Copy>(a: &[T], rows: usize, cols: usize) -> Vec<T> {
    (0..rows * cols)
        .map(|i| a[i % rows * cols + i / rows])
        .collect()
}

/// Exports `qlin` as GPTQ tensors in `layout` with zero convention `conv`. `name` (the module path, such as
/// `model.layers.0.mlp.down_proj`) prefixes every error, e.g. when in or out cannot be packed in the GPTQ layout
/// or when v1 meets a zero point 0. Scales round to f16, as the official checkpoints store them.
pub fn to_gptq_tensors(
    qlin: &QuantizedLinear,
    conv: ZeroConvention,
    layout: PackLayout,
    name: &str,
) -> Result<GptqTensors> {
    let (k, n, g, ng, bits) = (
        qlin.in_features(),
        qlin.out_features(),
        qlin.group_size(),
        qlin.groups(),
        qlin.wbits(),
    );
    let words = |v: Vec<u32>| v.into_iter().map(|w| w as i32).collect::<Vec<i32>>();
    let ints = transpose(&qlin.int_weights()?, n, k);
    let qweight = pack_rows(bits, layout, &ints, k, n, &format!("{name}.qweight"))?;
    let zeros: Vec<u32> = transpose(qlin.zeros(), n, ng)
        .into_iter()
        .map(u32::from)
        .collect();
    let qzeros = pack_qzeros(bits, layout, conv, &zeros, ng, n, &format!("{name}.qzeros"))?;
    let scales = transpose(qlin.scales().f32s("to_gptq_tensors")?, n, ng);
    Ok(GptqTensors {
        qweight_shape: [layout.words_for(bits, k, name)?, n],
        qweight: words(qweight),
        qzeros_shape: [ng, layout.words_for(bits, n, name)?],
        qzeros: words(qzeros),
        scales: Tensor::from_vec(&[ng, n], scales)?.to_dtype(DType::F16),
        g_idx: (0..k).map(|i| (i / g) as i32).collect(),
    })
}

/// Reads GPTQ tensors back into a [`QuantizedLinear`] with `wbits` and `group_size` (from quantize_config.json);
/// in_features is g_idx's length, out_features the scales' width. Errors name `name` and the tensor: shapes
/// that do not match, a permuted g_idx (desc_act), or a zero point past 2^b − 1 (a v1 file's wrapped z = 0).
pub fn from_gptq_tensors(
    t: &GptqTensors,
    wbits: u32,
    group_size: usize,
    conv: ZeroConvention,
    layout: PackLayout,
    name: &str,
) -> Result<QuantizedLinear> {
    let op = "from_gptq_tensors";
    let &[ng, n] = t.scales.shape() else {
        return Err(Error::shape(
            op,
            format!(
                "{name}.scales {:?} must be 2-D [groups, out]",
                t.scales.shape()
            ),
        ));
    };
    let k = t.g_idx.len();
    if group_size == 0 || ng.checked_mul(group_size) != Some(k) {
        return Err(Error::shape(
            op,
            format!(
                "{name}: scales {:?} with group_size {group_size} do not cover g_idx [{k}]",
                t.scales.shape()
            ),
        ));
    }
    if let Some(i) = (0..k).find(|&i| t.g_idx[i] as i64 != (i / group_size) as i64) {
        return Err(Error::invalid(
            op,
            format!("{name}.g_idx[{i}] = {} but {i} / {group_size} = {}: permuted g_idx (desc_act) is not supported",
                t.g_idx[i], i / group_size),
        ));
    }
    let words = |v: &[i32]| v.iter().map(|&w| w as u32).collect::<Vec<u32>>();
    let qw_name = format!("{name}.qweight");
    let want = [layout.words_for(wbits, k, &qw_name)?, n];
    if t.qweight_shape != want || t.qweight.len() != want[0] * n {
        return Err(Error::shape(
            op,
            format!(
                "{qw_name} {:?} ({} values), need {want:?} for in {k}, out {n}",
                t.qweight_shape,
                t.qweight.len()
            ),
        ));
    }
    let ints = transpose(
        &unpack_rows(wbits, layout, &words(&t.qweight), k, n, &qw_name)?,
        k,
        n,
    );
    let qz_name = format!("{name}.qzeros");
    let want = [ng, layout.words_for(wbits, n, &qz_name)?];
    if t.qzeros_shape != want || t.qzeros.len() != want[0] * want[1] {
        return Err(Error::shape(
            op,
            format!(
                "{qz_name} {:?} ({} values), need {want:?} for out {n}",
                t.qzeros_shape,
                t.qzeros.len()
            ),
        ));
    }
    let zeros = unpack_qzeros(wbits, layout, conv, &words(&t.qzeros), ng, n, &qz_name)?;
    let qmax = (1u32 << wbits) - 1;
    if let Some(i) = zeros.iter().position(|&z| z > qmax) {
        return Err(Error::invalid(
            op,
            format!(
                "{qz_name}[group {}, column {}] reads as zero point {} > {qmax}: a v1 file whose z = 0 wrapped",
                i / n,
                i % n,
                zeros[i]
            ),
        ));
    }
    let scales = transpose(t.scales.to_dtype(DType::F32).f32s(op)?, ng, n);
    QuantizedLinear::from_ints(
        wbits,
        group_size,
        k,
        n,
        &ints,
        &transpose(&zeros, ng, n),
        Tensor::from_vec(&[n, ng], scales)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::pack::SUPPORTED_BITS;
    use crate::tensor::rng::Rng;
    use half::f16;

    /// A layer with f16-exact scales (so the f16 export loses nothing) and zeros ≥ 1 (so v1 can hold them).
    fn layer(rng: &mut Rng, n: usize, k: usize, g: usize, bits: u32) -> QuantizedLinear {
        let ng = k / g;
        let ints: Vec<u32> = (0..n * k).map(|_| rng.below(1 << bits) as u32).collect();
        let zeros: Vec<u32> = (0..n * ng)
            .map(|_| 1 + rng.below((1 << bits) - 1) as u32)
            .collect();
        let scales = (0..n * ng)
            .map(|_| f16::from_f64(0.001 + 0.1 * rng.uniform()).to_f32())
            .collect();
        QuantizedLinear::from_ints(
            bits,
            g,
            k,
            n,
            &ints,
            &zeros,
            Tensor::from_vec(&[n, ng], scales).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn gptq_tensors_round_trip_every_width_convention_and_layout() {
        let mut rng = Rng::new(51);
        for bits in SUPPORTED_BITS {
            // (out, in, group): GPTQ-packable at every width; odd ones only EQAT can pack.
            for (n, k, g) in [(32, 64, 32), (64, 96, 96), (13, 45, 15), (3, 10, 5)] {
                let q = layer(&mut rng, n, k, g, bits);
                for conv in [ZeroConvention::V1, ZeroConvention::V2] {
                    for layout in [PackLayout::Gptq, PackLayout::EqatTenPerWord] {
                        let t = match to_gptq_tensors(&q, conv, layout, "m.l") {
                            Ok(t) => t,
                            Err(e) => {
                                assert!(
                                    layout == PackLayout::Gptq && (n % 32 != 0 || k % 32 != 0),
                                    "{e}"
                                );
                                continue;
                            }
                        };
                        assert_eq!(t.qweight_shape, [layout.words_for(bits, k, "").unwrap(), n]);
                        assert_eq!(
                            t.qzeros_shape,
                            [k / g, layout.words_for(bits, n, "").unwrap()]
                        );
                        assert_eq!(
                            (t.scales.shape(), t.scales.dtype()),
                            (&[k / g, n][..], DType::F16)
                        );
                        assert_eq!(t.g_idx[k - 1] as usize, (k - 1) / g);
                        let back = from_gptq_tensors(&t, bits, g, conv, layout, "m.l").unwrap();
                        let what = format!("w{bits} [{n}, {k}] g{g} {conv:?} {layout:?}");
                        assert_eq!(
                            back.int_weights().unwrap(),
                            q.int_weights().unwrap(),
                            "{what}"
                        );
                        assert_eq!(back.zeros(), q.zeros(), "{what}");
                        let d = |q: &QuantizedLinear| {
                            q.dequantize().unwrap().f32s("t").unwrap().to_vec()
                        };
                        assert_eq!(d(&back), d(&q), "{what}");
                    }
                }
            }
        }
    }

    #[test]
    fn v1_and_v2_differ_only_in_qzeros_by_one_per_field() {
        let mut rng = Rng::new(52);
        let q = layer(&mut rng, 32, 64, 16, 4);
        let v1 = to_gptq_tensors(&q, ZeroConvention::V1, PackLayout::Gptq, "m").unwrap();
        let v2 = to_gptq_tensors(&q, ZeroConvention::V2, PackLayout::Gptq, "m").unwrap();
        assert_eq!(v1.qweight, v2.qweight);
        let sub: Vec<i32> = v2
            .qzeros
            .iter()
            .map(|&w| w.wrapping_sub(0x1111_1111))
            .collect();
        assert_eq!(sub, v1.qzeros);
        // Reading v2 words as v1 shifts every zero up by one: the convention must match the file.
        let wrong =
            from_gptq_tensors(&v1, 4, 16, ZeroConvention::V2, PackLayout::Gptq, "m").unwrap();
        let want: Vec<u8> = q.zeros().iter().map(|z| z - 1).collect();
        assert_eq!(wrong.zeros(), &want[..]);
    }

    #[test]
    fn unexportable_layers_and_bad_tensors_are_named_errors() {
        let mut rng = Rng::new(53);
        let q = layer(&mut rng, 32, 40, 8, 3);
        let e = to_gptq_tensors(
            &q,
            ZeroConvention::V2,
            PackLayout::Gptq,
            "model.layers.3.mlp.down_proj",
        );
        let e = e.unwrap_err().to_string();
        assert!(
            e.contains("model.layers.3.mlp.down_proj.qweight")
                && e.contains("40")
                && e.contains("32"),
            "{e}"
        );
        let q = layer(&mut rng, 12, 32, 8, 4);
        let e = to_gptq_tensors(&q, ZeroConvention::V2, PackLayout::Gptq, "q_proj")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("q_proj.qzeros") && e.contains("12") && e.contains("multiple of 8"),
            "{e}"
        );
        let z0 = QuantizedLinear::from_ints(
            2,
            16,
            16,
            16,
            &[0; 256],
            &[0; 16],
            Tensor::full(&[16, 1], 0.5),
        )
        .unwrap();
        let e = to_gptq_tensors(&z0, ZeroConvention::V1, PackLayout::Gptq, "k_proj")
            .unwrap_err()
            .to_string();
        assert!(e.contains("k_proj.qzeros") && e.contains("gptq_v2"), "{e}");

        let good = to_gptq_tensors(
            &layer(&mut rng, 16, 32, 16, 2),
            ZeroConvention::V1,
            PackLayout::Gptq,
            "m",
        )
        .unwrap();
        let mut t = good.clone();
        t.g_idx.swap(0, 31);
        let e = from_gptq_tensors(&t, 2, 16, ZeroConvention::V1, PackLayout::Gptq, "v_proj")
            .unwrap_err();
        assert!(
            e.to_string().contains("v_proj.g_idx[0]") && e.to_string().contains("desc_act"),
            "{e}"
        );
        let mut t = good.clone();
        t.qweight_shape = [4, 16];
        let e = from_gptq_tensors(&t, 2, 16, ZeroConvention::V1, PackLayout::Gptq, "o_proj")
            .unwrap_err();
        assert!(
            e.to_string().contains("o_proj.qweight [4, 16]") && e.to_string().contains("[2, 16]"),
            "{e}"
        );
        let e =
            from_gptq_tensors(&good, 2, 8, ZeroConvention::V1, PackLayout::Gptq, "up").unwrap_err();
        assert!(e.to_string().contains("group_size 8"), "{e}");
        // A v1 field holding 3 (2 bits) reads as z = 4: the wrapped z = 0 of a v1 packer.
        let mut t = good;
        t.qzeros[0] |= 0b11;
        let e =
            from_gptq_tensors(&t, 2, 16, ZeroConvention::V1, PackLayout::Gptq, "gate").unwrap_err();
        assert!(
            e.to_string()
                .contains("gate.qzeros[group 0, column 0] reads as zero point 4"),
            "{e}"
        );
    }
}
