//! Structured round trips through the packers: every bit width (plus unsupported ones), both layouts, odd shapes,
//! random values (sometimes out of range). pack must return Ok exactly when the shape and values can be packed,
//! and then unpack(pack(v)) == v; unpacking arbitrary words with arbitrary shapes must return Ok or Err, never
//! panic. Then a whole layer through GPTQ tensors and back (both conventions and layouts).
//!
//! cargo +nightly fuzz run fuzz_pack
#![no_main]
use eqat::quant::pack::*;
use eqat::quant::real_quant::gptq::{from_gptq_tensors, to_gptq_tensors};
use eqat::quant::real_quant::QuantizedLinear;
use eqat::Tensor;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

fn layout(u: &mut Unstructured) -> Result<PackLayout> {
    Ok(if u.arbitrary()? {
        PackLayout::Gptq
    } else {
        PackLayout::EqatTenPerWord
    })
}

fn values(u: &mut Unstructured, n: usize, qmax: u32, in_range: bool) -> Result<Vec<u32>> {
    (0..n)
        .map(|_| {
            let v: u32 = u.arbitrary()?;
            Ok(if in_range { v & qmax } else { v })
        })
        .collect()
}

/// Whether `layout` can pack a stream of `n` values at a supported width `bits`.
fn fits(bits: u32, layout: PackLayout, n: usize) -> bool {
    let unit = if bits == 3 { 32 } else { 32 / bits as usize };
    layout == PackLayout::EqatTenPerWord || n % unit == 0
}

fn matrices(u: &mut Unstructured) -> Result<()> {
    let bits = *u.choose(&[1u32, 2, 3, 4, 5, 8, 9])?;
    let supported = SUPPORTED_BITS.contains(&bits);
    let layout = layout(u)?;
    let (rows, cols) = (u.int_in_range(0..=130usize)?, u.int_in_range(0..=70usize)?);
    let qmax = (1u32 << bits.min(31)) - 1;
    let mostly_in_range = u.ratio(7, 8)?;
    let v = values(u, rows * cols, qmax, mostly_in_range)?;
    let in_range = v.iter().all(|&x| x <= qmax);

    let packed = pack_rows(bits, layout, &v, rows, cols, "fuzz");
    assert_eq!(packed.is_ok(), supported && in_range && fits(bits, layout, rows), "{packed:?}");
    if let Ok(w) = packed {
        assert_eq!(unpack_rows(bits, layout, &w, rows, cols, "fuzz").unwrap(), v);
    }
    let packed = pack_cols(bits, layout, &v, rows, cols, "fuzz");
    assert_eq!(packed.is_ok(), supported && in_range && fits(bits, layout, cols), "{packed:?}");
    if let Ok(w) = packed {
        assert_eq!(unpack_cols(bits, layout, &w, rows, cols, "fuzz").unwrap(), v);
        if rows > 0 {
            let mut row = vec![0.0f32; cols];
            unpack_stream_f32(bits, layout, &w[..w.len() / rows], &mut row).unwrap();
            assert!(row.iter().zip(&v).all(|(&a, &b)| a == b as f32));
        }
    }
    for conv in [ZeroConvention::V1, ZeroConvention::V2] {
        let packed = pack_qzeros(bits, layout, conv, &v, rows, cols, "fuzz");
        let storable = v.iter().all(|&z| z >= conv.offset());
        let ok = supported && in_range && storable && fits(bits, layout, cols);
        // V1 may also fail for z = 0 before the range check: both are errors, so only Ok must match exactly.
        assert_eq!(packed.is_ok(), ok, "{packed:?}");
        if let Ok(w) = packed {
            assert_eq!(unpack_qzeros(bits, layout, conv, &w, rows, cols, "fuzz").unwrap(), v);
        }
    }
    // Arbitrary words with arbitrary shapes: Ok or Err, no panic.
    let n_words = u.int_in_range(0..=64usize)?;
    let words = values(u, n_words, 0, false)?;
    let (r, c) = (u.int_in_range(0..=300usize)?, u.int_in_range(0..=300usize)?);
    let _ = unpack_rows(bits, layout, &words, r, c, "fuzz");
    let _ = unpack_cols(bits, layout, &words, r, c, "fuzz");
    let mut out = vec![0.0f32; r];
    let _ = unpack_stream_f32(bits, layout, &words, &mut out);
    Ok(())
}

fn layer(u: &mut Unstructured) -> Result<()> {
    let bits = *u.choose(&SUPPORTED_BITS)?;
    let qmax = (1u32 << bits) - 1;
    let (g, groups, n) = (
        u.int_in_range(1..=40usize)?,
        u.int_in_range(1..=3usize)?,
        u.int_in_range(0..=40usize)?,
    );
    let k = g * groups;
    let w_int = values(u, n * k, qmax, true)?;
    let zeros = values(u, n * groups, qmax, true)?;
    // f16-exact scales (11 significant bits, exponents from f16's subnormals to its max), so the f16 export
    // loses nothing and the round trip is bit-exact.
    let scales = (0..n * groups)
        .map(|_| {
            let (m, e) = (u.int_in_range(0..=2047u32)?, u.int_in_range(-24..=5i32)?);
            Ok(m as f32 * 2f32.powi(e))
        })
        .collect::<Result<Vec<f32>>>()?;
    let scales = Tensor::from_vec(&[n, groups], scales).unwrap();
    let q = QuantizedLinear::from_ints(bits, g, k, n, &w_int, &zeros, scales).unwrap();
    assert_eq!(q.int_weights().unwrap(), w_int);
    let w = q.dequantize().unwrap();
    for conv in [ZeroConvention::V1, ZeroConvention::V2] {
        let layout = layout(u)?;
        let t = to_gptq_tensors(&q, conv, layout, "fuzz");
        let ok = fits(bits, layout, k)
            && fits(bits, layout, n)
            && zeros.iter().all(|&z| z >= conv.offset());
        assert_eq!(t.is_ok(), ok, "{t:?}");
        if let Ok(t) = t {
            let back = from_gptq_tensors(&t, bits, g, conv, layout, "fuzz").unwrap();
            assert_eq!(back.int_weights().unwrap(), w_int);
            assert_eq!(back.zeros(), q.zeros());
            let w2 = back.dequantize().unwrap();
            let (a, b) = (w.f32s("fuzz").unwrap(), w2.f32s("fuzz").unwrap());
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = if u.arbitrary().unwrap_or(false) {
        layer(&mut u)
    } else {
        matrices(&mut u)
    };
});
