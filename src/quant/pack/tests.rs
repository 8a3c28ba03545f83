use super::*;
use crate::tensor::rng::Rng;

const LAYOUTS: [PackLayout; 2] = [PackLayout::Gptq, PackLayout::EqatTenPerWord];

fn random_ints(rng: &mut Rng, n: usize, bits: u32) -> Vec<u32> {
    (0..n).map(|_| rng.below(1 << bits) as u32).collect()
}

#[test]
fn four_bit_words_hold_values_least_significant_first() {
    let v: Vec<u32> = (0..16).map(|i| i % 16).collect();
    for layout in LAYOUTS {
        let w = pack_cols(4, layout, &v, 1, 16, "t").unwrap();
        assert_eq!(w, [0x7654_3210, 0xfedc_ba98], "{layout:?}");
    }
    // 2 and 8 bits: v_j at bits b·j.
    let w = pack_cols(
        2,
        PackLayout::Gptq,
        &[1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3],
        1,
        16,
        "t",
    );
    assert_eq!(w.unwrap(), [0b11 << 30 | 0b11_10_01]);
    let w = pack_cols(8, PackLayout::Gptq, &[0x12, 0x34, 0x56, 0x78], 1, 4, "t");
    assert_eq!(w.unwrap(), [0x7856_3412]);
}

#[test]
fn gptq_three_bit_straddles_words_as_autogptq() {
    // formats.md §5.3: value 10 = low 2 bits at word 0 bits 30-31, bit 2 at word 1 bit 0; value 21 = bit 0 at
    // word 1 bit 31, bits 1-2 at word 2 bits 0-1; 9 at word 0 bits 27-29, 11 at word 1 bits 1-3, 22 at word 2
    // bits 2-4, 31 at word 2 bits 29-31.
    let one = |i: usize, v: u32| {
        let mut s = vec![0u32; 32];
        s[i] = v;
        pack_cols(3, PackLayout::Gptq, &s, 1, 32, "t").unwrap()
    };
    assert_eq!(one(10, 0b111), [0b11 << 30, 1, 0]);
    assert_eq!(one(10, 0b100), [0, 1, 0]);
    assert_eq!(one(21, 0b111), [0, 1 << 31, 0b11]);
    assert_eq!(one(21, 0b110), [0, 0, 0b11]);
    assert_eq!(one(9, 0b101), [0b101 << 27, 0, 0]);
    assert_eq!(one(11, 0b111), [0, 0b111 << 1, 0]);
    assert_eq!(one(22, 0b111), [0, 0, 0b111 << 2]);
    assert_eq!(one(31, 0b111), [0, 0, 0b111 << 29]);
}

#[test]
fn eqat_three_bit_packs_ten_per_word_top_bits_unused() {
    let v: Vec<u32> = (0..23).map(|i| (i % 8) as u32).collect();
    let w = pack_cols(3, PackLayout::EqatTenPerWord, &v, 1, 23, "t").unwrap();
    assert_eq!(w.len(), 3);
    for (k, &word) in w.iter().enumerate() {
        assert_eq!(word >> 30, 0, "word {k}: bits 30-31 unused");
        for j in 0..10.min(23 - 10 * k) {
            assert_eq!((word >> (3 * j)) & 7, v[10 * k + j], "word {k} value {j}");
        }
    }
    // Value 10 starts word 1 (GPTQ would put its low bits in word 0).
    assert_eq!(w[1] & 7, v[10]);
}

#[test]
fn eqat_equals_gptq_at_2_4_8_bits_on_whole_words() {
    let mut rng = Rng::new(1);
    for bits in [2, 4, 8] {
        let (rows, cols) = (3 * 32 / bits as usize, 5);
        let v = random_ints(&mut rng, rows * cols, bits);
        assert_eq!(
            pack_rows(bits, PackLayout::Gptq, &v, rows, cols, "t").unwrap(),
            pack_rows(bits, PackLayout::EqatTenPerWord, &v, rows, cols, "t").unwrap()
        );
    }
}

#[test]
fn pack_unpack_round_trips_rows_and_cols_every_width_and_odd_shape() {
    let mut rng = Rng::new(2);
    for bits in SUPPORTED_BITS {
        for layout in LAYOUTS {
            for (rows, cols) in [
                (32, 1),
                (64, 7),
                (96, 3),
                (16, 13),
                (8, 33),
                (1, 5),
                (45, 11),
                (0, 4),
                (4, 0),
            ] {
                let v = random_ints(&mut rng, rows * cols, bits);
                match pack_rows(bits, layout, &v, rows, cols, "q") {
                    Ok(w) => {
                        let want = layout.words_for(bits, rows, "q").unwrap();
                        assert_eq!(w.len(), want * cols);
                        assert_eq!(unpack_rows(bits, layout, &w, rows, cols, "q").unwrap(), v);
                    }
                    Err(e) => {
                        assert!(
                            layout == PackLayout::Gptq,
                            "{bits}-bit {layout:?} {rows}x{cols}: {e}"
                        );
                        let unit = if bits == 3 { 32 } else { 32 / bits as usize };
                        assert!(
                            rows % unit != 0 && e.to_string().contains(&unit.to_string()),
                            "{e}"
                        );
                    }
                }
                match pack_cols(bits, layout, &v, rows, cols, "q") {
                    Ok(w) => {
                        assert_eq!(unpack_cols(bits, layout, &w, rows, cols, "q").unwrap(), v);
                        let mut row = vec![0.0; cols];
                        let wc = w.len() / rows.max(1);
                        for r in 0..rows {
                            unpack_stream_f32(bits, layout, &w[r * wc..(r + 1) * wc], &mut row)
                                .unwrap();
                            let want: Vec<f32> = v[r * cols..(r + 1) * cols]
                                .iter()
                                .map(|&x| x as f32)
                                .collect();
                            assert_eq!(row, want);
                        }
                    }
                    Err(_) => assert!(layout == PackLayout::Gptq),
                }
            }
        }
    }
}

#[test]
fn words_for_gives_gptq_and_eqat_shapes() {
    // GPTQ: in·b/32 rows; EQAT: ceil(in/(32//b)).
    for (bits, n, gptq, eqat) in [
        (2, 64, Some(4), 4),
        (3, 64, Some(6), 7),
        (3, 45, None, 5),
        (4, 12, None, 2),
        (8, 12, Some(3), 3),
    ] {
        assert_eq!(
            PackLayout::Gptq.words_for(bits, n, "t").ok(),
            gptq,
            "{bits} {n}"
        );
        assert_eq!(
            PackLayout::EqatTenPerWord.words_for(bits, n, "t").unwrap(),
            eqat
        );
    }
}

#[test]
fn unpackable_shapes_and_bad_values_are_clear_errors() {
    let e = pack_rows(
        3,
        PackLayout::Gptq,
        &[0; 40],
        40,
        1,
        "model.layers.0.mlp.down_proj.qweight",
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("down_proj.qweight") && msg.contains("40") && msg.contains("32"),
        "{msg}"
    );
    let e = pack_cols(4, PackLayout::Gptq, &[0; 12], 1, 12, "layer.qzeros")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layer.qzeros") && e.contains("12") && e.contains("multiple of 8"),
        "{e}"
    );
    let e = pack_cols(5, PackLayout::EqatTenPerWord, &[0; 6], 1, 6, "w")
        .unwrap_err()
        .to_string();
    assert!(e.contains("5-bit"), "{e}");
    let e = pack_cols(2, PackLayout::EqatTenPerWord, &[0, 1, 4], 1, 3, "w")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("value 4 at [0, 2]") && e.contains("max 3"),
        "{e}"
    );
    let e = pack_rows(2, PackLayout::EqatTenPerWord, &[0; 5], 2, 3, "w")
        .unwrap_err()
        .to_string();
    assert!(e.contains("5 values") && e.contains("[2, 3]"), "{e}");
    let e = unpack_cols(2, PackLayout::EqatTenPerWord, &[0; 3], 2, 20, "w")
        .unwrap_err()
        .to_string();
    assert!(e.contains("[2, 2]"), "{e}");
    let e = pack_rows(2, PackLayout::EqatTenPerWord, &[], usize::MAX, 2, "w").unwrap_err();
    assert!(e.to_string().contains("w:"), "{e}");
}

#[test]
fn zero_conventions_store_z_minus_one_or_z() {
    let z = [1u32, 2, 3, 4, 5, 6, 7, 8];
    let v1 = pack_qzeros(4, PackLayout::Gptq, ZeroConvention::V1, &z, 1, 8, "q").unwrap();
    let v2 = pack_qzeros(4, PackLayout::Gptq, ZeroConvention::V2, &z, 1, 8, "q").unwrap();
    assert_eq!(v1, [0x7654_3210]);
    assert_eq!(v2, [0x8765_4321]);
    for (conv, w) in [(ZeroConvention::V1, &v1), (ZeroConvention::V2, &v2)] {
        assert_eq!(
            unpack_qzeros(4, PackLayout::Gptq, conv, w, 1, 8, "q").unwrap(),
            z
        );
    }
    // Symmetric 4-bit v1 stores z = 8 as 7 (formats.md §5.4).
    let sym = pack_qzeros(4, PackLayout::Gptq, ZeroConvention::V1, &[8; 8], 1, 8, "q").unwrap();
    assert_eq!(sym, [0x7777_7777]);
    let mut z = vec![1u32; 32];
    z[21] = 0;
    let e = pack_qzeros(
        2,
        PackLayout::Gptq,
        ZeroConvention::V1,
        &z,
        2,
        16,
        "blk.qzeros",
    );
    let e = e.unwrap_err().to_string();
    assert!(
        e.contains("blk.qzeros") && e.contains("group 1, column 5") && e.contains("gptq_v2"),
        "{e}"
    );
    // z = 2^bits is out of range in both conventions (v1 would otherwise store it as 2^bits − 1).
    for conv in [ZeroConvention::V1, ZeroConvention::V2] {
        let e = pack_qzeros(2, PackLayout::Gptq, conv, &[4; 16], 1, 16, "z").unwrap_err();
        assert!(e.to_string().contains("value 4 at [0, 0]"), "{e}");
    }
}

/// Wrapping add of a cycle of per-word-column constants, as GPTQModel does on the int32 tensor.
fn add_offsets(words: &[u32], wcols: usize, offsets: &[u32], sign: i32) -> Vec<u32> {
    words
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            let c = offsets[i % wcols % offsets.len()];
            if sign > 0 {
                w.wrapping_add(c)
            } else {
                w.wrapping_sub(c)
            }
        })
        .collect()
}

#[test]
fn v1_to_v2_constants_match_formats_md_at_2_4_8_bits() {
    assert_eq!(v1_to_v2_offsets(2).unwrap(), [0x5555_5555]);
    assert_eq!(v1_to_v2_offsets(4).unwrap(), [0x1111_1111]);
    assert_eq!(v1_to_v2_offsets(8).unwrap(), [0x0101_0101]);
    // Fields start at bits 0,3,..,30 of word 0; 1,4,..,31 of word 1; 2,5,..,29 of word 2.
    assert_eq!(
        v1_to_v2_offsets(3).unwrap(),
        [0x4924_9249, 0x9249_2492, 0x2492_4924]
    );
}

#[test]
fn adding_the_constants_equals_repacking_with_the_other_convention() {
    let mut rng = Rng::new(3);
    for bits in SUPPORTED_BITS {
        let qmax = (1u32 << bits) - 1;
        let (groups, out) = (5, 96);
        let wcols = PackLayout::Gptq.words_for(bits, out, "t").unwrap();
        let offsets = v1_to_v2_offsets(bits).unwrap();
        for _ in 0..20 {
            // v1 cannot hold z = 0; at 3 bits also keep the carry inside words (see v1_to_v2_offsets).
            let z: Vec<u32> = (0..groups * out)
                .map(|i| loop {
                    let z = 1 + rng.below(qmax as usize) as u32;
                    let straddles = bits == 3 && [10, 21].contains(&(i % out % 32));
                    let carries = (i % out % 32 == 10 && (z - 1) & 3 == 3)
                        || (i % out % 32 == 21 && (z - 1) & 1 == 1);
                    if !(straddles && carries) {
                        break z;
                    }
                })
                .collect();
            let v1 = pack_qzeros(
                bits,
                PackLayout::Gptq,
                ZeroConvention::V1,
                &z,
                groups,
                out,
                "t",
            )
            .unwrap();
            let v2 = pack_qzeros(
                bits,
                PackLayout::Gptq,
                ZeroConvention::V2,
                &z,
                groups,
                out,
                "t",
            )
            .unwrap();
            assert_eq!(
                add_offsets(&v1, wcols, &offsets, 1),
                v2,
                "{bits}-bit v1 -> v2"
            );
            assert_eq!(
                add_offsets(&v2, wcols, &offsets, -1),
                v1,
                "{bits}-bit v2 -> v1"
            );
        }
    }
}

#[test]
fn three_bit_constant_add_loses_the_carry_of_straddling_fields() {
    // z = 4 in value 10: v1 stores 3 = 0b011, whose low 2 bits fill word 0 bits 30-31; +1 carries out of the word.
    let mut z = vec![1u32; 32];
    z[10] = 4;
    let v1 = pack_qzeros(3, PackLayout::Gptq, ZeroConvention::V1, &z, 1, 32, "t").unwrap();
    let v2 = pack_qzeros(3, PackLayout::Gptq, ZeroConvention::V2, &z, 1, 32, "t").unwrap();
    let added = add_offsets(&v1, 3, &v1_to_v2_offsets(3).unwrap(), 1);
    assert_ne!(added, v2);
    assert_eq!(
        unpack_qzeros(3, PackLayout::Gptq, ZeroConvention::V2, &added, 1, 32, "t").unwrap()[10],
        0
    );
}

#[test]
fn gptqmodel_three_bit_constants_swap_word_columns_0_and_2() {
    // formats.md §5.4's table (GPTQModel) for column % 3 = 0, 1, 2.
    let gptqmodel = [0x2492_4924, 0x9249_2492, 0x4924_9249];
    let z = vec![2u32; 32];
    let v1 = pack_qzeros(3, PackLayout::Gptq, ZeroConvention::V1, &z, 1, 32, "t").unwrap();
    let read = unpack_qzeros(
        3,
        PackLayout::Gptq,
        ZeroConvention::V2,
        &add_offsets(&v1, 3, &gptqmodel, 1),
        1,
        32,
        "t",
    );
    // Values 0..9 gain 4 instead of 1 (1 + 4 = 5), so the GPTQModel table does not invert AutoGPTQ's 3-bit pack.
    assert_eq!(read.unwrap()[..10], [5; 10]);
}
