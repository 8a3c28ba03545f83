//! GPU memory of the two training phases, counted from the shapes (glossary in plan/mod.rs).
//!
//! Block-AP holds one block at a time: its f32 master weights with their gradients and AdamW moments, its
//! scales and zeros (f32, trained with AdamW too), the seven fake-quantized weights in the compute dtype (saved
//! for the input gradient), the activations the backward needs for N = batch × seqlen tokens, the activation
//! gradients alive at once in the MLP backward, and the next block's weights being prefetched.
//!
//! Activations saved for backward, per token, in the compute dtype (what fused kernels need, nothing else):
//!   x, target, output (MSE)        3C     attention: q, k, v after RoPE, its output   2·H·D + 2·G·D
//!   rmsnorm outputs h, h2          2C     x1 = x + attention (the second rmsnorm's input)   C
//!   gate, up, swiglu output        3F     (RoPE saves nothing: its backward is the inverse rotation)
//! plus f32 per token: one rstd per rmsnorm (2) and attention's log-sum-exp per head (H), as flash attention
//! keeps. Backward scratch: the MLP's dgate, dup and dswiglu (3F) with dout and dh2 (2C).
//!
//! E2E-QP as `train::e2e_qp` runs it on a GPU (offload on, the default): the whole packed model (integers and
//! zero points in u32 words), the f32 scales, the frozen head and norms (f32; an untied embedding stays on the
//! host), and, per sequence of T tokens, the larger of two working sets: one block's backward (its input back
//! from pinned host memory and the next block's on its way, its recomputed f32 activations, the MLP backward's gradients, and one linear's f32
//! weight gradient dW that the scales' gradient is reduced from, with the bf16 casts of its operands), or the
//! head's (the f32 logits with their gradient). The scales' gradients, their AdamW moments and the block
//! checkpoints live in pinned host memory ([`e2e_qp_pinned`]).
use super::{count, prod, BlockCounts, ComputeDType, Phase, PlanInput, Term};
use crate::error::Result;
use crate::quant::pack::PackLayout;

/// Compute-dtype values one token keeps for a block's backward, excluding the MSE's target and output.
pub fn block_activations_per_token(p: &PlanInput) -> u64 {
    let c = &p.cfg;
    let (hd, gd) = (
        (c.n_heads * c.head_dim) as u64,
        (c.n_kv_heads * c.head_dim) as u64,
    );
    // x, h, x1, h2; q, attention output; k, v; gate, up, swiglu output.
    4 * c.hidden as u64 + 2 * hd + 2 * gd + 3 * c.intermediate as u64
}

/// f32 values one token keeps: two rstd and H log-sum-exps.
pub fn block_f32_per_token(p: &PlanInput) -> u64 {
    2 + p.cfg.n_heads as u64
}

/// Compute-dtype values of the MLP backward's activation gradients per token.
pub fn backward_scratch_per_token(p: &PlanInput) -> u64 {
    3 * p.cfg.intermediate as u64 + 2 * p.cfg.hidden as u64
}

pub fn block_ap(p: &PlanInput) -> Result<Phase> {
    let b = BlockCounts::of(&p.cfg, p.quant)?;
    let d = p.dtype.bytes();
    let dn = p.dtype.name();
    let params = b.linear + b.norms;
    let n = prod(&[p.batch as u64, p.seqlen as u64])?;
    let c = p.cfg.hidden as u64;
    let act = block_activations_per_token(p) + 2 * c;
    let f32s = block_f32_per_token(p);
    let scratch = backward_scratch_per_token(p);
    let pn = count(params);
    Ok(Phase {
        name: "Block-AP (GPU, one block)",
        terms: vec![
            Term {
                what: "master weights",
                bytes: prod(&[params, 4])?,
                arithmetic: format!("{pn} params (7 linears + 2 norms) × 4 B f32"),
            },
            Term {
                what: "gradients",
                bytes: prod(&[params, 4])?,
                arithmetic: format!("{pn} × 4 B f32"),
            },
            Term {
                what: "AdamW moments",
                bytes: prod(&[params, 8])?,
                arithmetic: format!("{pn} × 2 × 4 B f32"),
            },
            Term {
                what: "scales, zeros (+grad, AdamW)",
                bytes: prod(&[b.groups, 2, 4, 4])?,
                arithmetic: format!(
                    "{} groups × 2 tensors × (value, grad, m, v) × 4 B",
                    count(b.groups)
                ),
            },
            Term {
                what: "fake-quantized weights",
                bytes: prod(&[b.linear, d])?,
                arithmetic: format!("{} × {d} B {dn}", count(b.linear)),
            },
            Term {
                what: "activations for backward",
                bytes: prod(&[n, act, d])? + prod(&[n, f32s, 4])?,
                arithmetic: format!("{n} tokens × ({act} × {d} B {dn} + {f32s} × 4 B rstd/LSE)"),
            },
            Term {
                what: "backward scratch",
                bytes: prod(&[n, scratch, d])?,
                arithmetic: format!("{n} tokens × {scratch} (3F + 2C) × {d} B"),
            },
            Term {
                what: "next block prefetched",
                bytes: prod(&[params, 2])?,
                arithmetic: format!("{pn} × 2 B (bf16 checkpoint)"),
            },
        ],
    })
}

/// Bytes of the packed integer weights of one block (u32 words, EQAT layout: 16/10/8/4 values per word).
pub fn packed_block_bytes(p: &PlanInput) -> Result<u64> {
    let mut words = 0u64;
    for (name, n, k) in p.cfg.linear_shapes() {
        let per_row = PackLayout::EqatTenPerWord.words_for(p.quant.wbits, k, name)?;
        words += prod(&[n as u64, per_row as u64])?;
    }
    prod(&[words, 4])
}

/// f32 values one token keeps on the tape of a recomputed block: x, h, x1, h2, the down projection, the output,
/// the incoming gradient and the surrogate product (8C); q, its reshape and RoPE, the attention output and its
/// reshape (5·H·D); k and v with their reshapes and k's RoPE (5·G·D); gate, up, swiglu (3F); 2 rstd and H LSEs.
pub fn e2e_block_values_per_token(p: &PlanInput) -> u64 {
    let c = &p.cfg;
    let (hd, gd) = (
        (c.n_heads * c.head_dim) as u64,
        (c.n_kv_heads * c.head_dim) as u64,
    );
    8 * c.hidden as u64 + 5 * hd + 5 * gd + 3 * c.intermediate as u64 + block_f32_per_token(p)
}

/// Bytes of the packed zero points of one block: each row's groups in u32 words, as the integers.
pub fn packed_zero_block_bytes(p: &PlanInput) -> Result<u64> {
    let mut words = 0u64;
    for (name, n, k) in p.cfg.linear_shapes() {
        let groups = k / p.quant.group_len(k)?;
        let per_row = PackLayout::EqatTenPerWord.words_for(p.quant.wbits, groups, name)?;
        words += prod(&[n as u64, per_row as u64])?;
    }
    prod(&[words, 4])
}

pub fn e2e_qp(p: &PlanInput) -> Result<Phase> {
    let b = BlockCounts::of(&p.cfg, p.quant)?;
    let cfg = &p.cfg;
    let l = cfg.n_layers as u64;
    let (c, v, f) = (cfg.hidden as u64, cfg.vocab as u64, cfg.intermediate as u64);
    let t = p.e2e_seqlen as u64;
    let groups = prod(&[b.groups, l])?;
    let values = e2e_block_values_per_token(p);
    // The bf16 mode's casts: dout (up to F wide) and x (C) of the linear whose dW is being formed.
    let casts = match p.dtype {
        ComputeDType::Bf16 => prod(&[t, f + c, 2])?,
        ComputeDType::F32 => 0,
    };
    // + C: the next block's input, copied back from pinned memory while this block computes (e2e_qp::offload).
    let block = prod(&[t, values + 3 * c + 2 * f, 4])? + prod(&[b.largest_linear, 4])? + casts;
    let head_casts = match p.dtype {
        ComputeDType::Bf16 => prod(&[v + t, c, 2])?,
        ComputeDType::F32 => 0,
    };
    // The head's tape: the last block's output, h, dx (3 × T × C) and the logits with their gradient.
    let head = prod(&[t, 3 * c + 2 * v, 4])? + head_casts;
    let cast_note = if casts > 0 { " + casts" } else { "" };
    let work_what = format!(
        "max(block backward {t} × ({values} + 3C + 2F) × 4 B + dW {} × 4 B{cast_note} = {}, \
         head {t} × (3C + 2V) × 4 B{cast_note} = {})",
        count(b.largest_linear),
        super::human(block),
        super::human(head)
    );
    Ok(Phase {
        name: "E2E-QP (GPU, whole model)",
        terms: vec![
            Term {
                what: "packed weights",
                bytes: prod(&[packed_block_bytes(p)?, l])?,
                arithmetic: format!(
                    "{l} blocks × {} params at {} bits in u32 words",
                    count(b.linear),
                    p.quant.wbits
                ),
            },
            Term {
                what: "zeros",
                bytes: prod(&[packed_zero_block_bytes(p)?, l])?,
                arithmetic: format!(
                    "{} groups at {} bits in u32 words",
                    count(groups),
                    p.quant.wbits
                ),
            },
            Term {
                what: "scales",
                bytes: prod(&[groups, 4])?,
                arithmetic: format!(
                    "{} groups × 4 B f32 (gradient, AdamW m, v in pinned host memory)",
                    count(groups)
                ),
            },
            Term {
                what: "head, norms",
                bytes: prod(&[v, c, 4])? + prod(&[2 * l + 1, c, 4])?,
                arithmetic: format!(
                    "{v} × {c} × 4 B f32 + (2L + 1) × {c} × 4 B{}",
                    if cfg.tie_embeddings {
                        " (tied)"
                    } else {
                        "; the embedding on the host"
                    }
                ),
            },
            Term {
                what: "per-sequence working set",
                bytes: block.max(head),
                arithmetic: work_what,
            },
        ],
    })
}

/// Pinned host memory of an offloaded E2E-QP GPU run: every block's input checkpoint (f32), the scales'
/// gradients and AdamW moments (f32), and an untied embedding table (f32, pageable).
pub fn e2e_qp_pinned(p: &PlanInput) -> Result<Phase> {
    let b = BlockCounts::of(&p.cfg, p.quant)?;
    let cfg = &p.cfg;
    let l = cfg.n_layers as u64;
    let (c, v, t) = (cfg.hidden as u64, cfg.vocab as u64, p.e2e_seqlen as u64);
    let groups = prod(&[b.groups, l])?;
    let mut terms = vec![
        Term {
            what: "block checkpoints",
            bytes: prod(&[l, t, c, 4])?,
            arithmetic: format!("{l} blocks × {t} tokens × {c} × 4 B"),
        },
        Term {
            what: "scale gradients, AdamW m, v",
            bytes: prod(&[groups, 3, 4])?,
            arithmetic: format!("{} groups × 3 × 4 B f32", count(groups)),
        },
    ];
    if !cfg.tie_embeddings {
        terms.push(Term {
            what: "embedding",
            bytes: prod(&[v, c, 4])?,
            arithmetic: format!("{v} × {c} × 4 B f32"),
        });
    }
    Ok(Phase {
        name: "E2E-QP (host memory of the GPU run)",
        terms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{shape, ComputeDType};
    use crate::quant::fake_quant::QuantConfig;

    fn input(name: &str) -> PlanInput {
        PlanInput {
            cfg: shape(name).unwrap(),
            quant: QuantConfig::new(2, 64).unwrap(),
            train_size: 4096,
            val_size: 64,
            seqlen: 2048,
            batch: 2,
            epochs: 2,
            dtype: ComputeDType::Bf16,
            e2e_seqlen: 4096,
        }
    }

    fn bytes(ph: &Phase, what: &str) -> u64 {
        ph.term(what)
            .unwrap_or_else(|| panic!("no term {what}"))
            .bytes
    }

    #[test]
    fn block_ap_terms_match_hand_counts_smollm2() {
        let ph = block_ap(&input("smollm2-135m")).unwrap();
        // P = 3_538_944 linear weights + 2 × 576 norm weights = 3_540_096 params.
        let params = 3_538_944 + 1152;
        assert_eq!(bytes(&ph, "master weights"), params * 4);
        assert_eq!(bytes(&ph, "gradients"), params * 4);
        assert_eq!(bytes(&ph, "AdamW moments"), params * 8);
        // Gr = 3_538_944 / 64 = 55_296 groups; scales and zeros, each with grad, m, v in f32.
        assert_eq!(
            bytes(&ph, "scales, zeros (+grad, AdamW)"),
            55_296 * 2 * 4 * 4
        );
        assert_eq!(bytes(&ph, "fake-quantized weights"), 3_538_944 * 2);
        // N = 2 × 2048 = 4096 tokens. Per token in bf16: 6C (x, target, output, h, x1, h2) = 3456,
        // q + attention output 2 × 9 × 64 = 1152, k + v 2 × 3 × 64 = 384, gate/up/swiglu 3 × 1536 = 4608:
        // 9600 values × 2 B; f32: 2 rstd + 9 LSE.
        assert_eq!(
            bytes(&ph, "activations for backward"),
            4096 * 9600 * 2 + 4096 * 11 * 4
        );
        // 3F + 2C = 4608 + 1152.
        assert_eq!(bytes(&ph, "backward scratch"), 4096 * 5760 * 2);
        assert_eq!(bytes(&ph, "next block prefetched"), params * 2);
    }

    #[test]
    fn block_ap_terms_match_hand_counts_llama2_7b() {
        let mut p = input("llama2-7b");
        p.dtype = ComputeDType::F32;
        let ph = block_ap(&p).unwrap();
        let params = 202_375_168 + 8192;
        assert_eq!(bytes(&ph, "master weights"), params * 4);
        assert_eq!(bytes(&ph, "AdamW moments"), params * 8);
        assert_eq!(bytes(&ph, "scales, zeros (+grad, AdamW)"), 3_162_112 * 32);
        assert_eq!(bytes(&ph, "fake-quantized weights"), 202_375_168 * 4);
        // Per token: 6 × 4096 + 2 × 4096 (q, attention output) + 2 × 4096 (k, v: 32 kv heads) + 3 × 11008
        // = 73_984 values × 4 B (f32 compute), and 2 + 32 f32.
        assert_eq!(
            bytes(&ph, "activations for backward"),
            4096 * 73_984 * 4 + 4096 * 34 * 4
        );
        assert_eq!(
            bytes(&ph, "backward scratch"),
            4096 * (3 * 11008 + 2 * 4096) * 4
        );
        // 0.754 GiB master + 0.754 grads + 1.508 AdamW + 0.094 quant + 0.754 fake-quant + 1.129 activations
        // + 0.629 scratch + 0.377 prefetch = 5.999 GiB.
        let total = ph.total() as f64 / (1u64 << 30) as f64;
        assert!((total - 5.999).abs() < 0.002, "{total}");
    }

    #[test]
    fn e2e_terms_match_hand_counts_llama2_7b() {
        let ph = e2e_qp(&input("llama2-7b")).unwrap();
        // 2 bits: 16 values per u32 word, every K (4096, 11008) divides: P × 2 / 8 bytes per block.
        assert_eq!(bytes(&ph, "packed weights"), 32 * 202_375_168 / 4);
        // Zero points, 16 per word: q, k, v, o and gate, up read 4096 (64 groups, 4 words per row) over
        // 4·4096 + 2·11008 rows; down reads 11008 (172 groups, 11 words) over 4096 rows.
        assert_eq!(
            bytes(&ph, "zeros"),
            32 * ((4 * 4096 + 2 * 11008) * 4 + 4096 * 11) * 4
        );
        assert_eq!(bytes(&ph, "scales"), 32 * 3_162_112 * 4);
        // Untied: the head 32000 × 4096 in f32 (the embedding on the host); 65 norms of 4096.
        assert_eq!(bytes(&ph, "head, norms"), 32000 * 4096 * 4 + 65 * 4096 * 4);
        // Per token: 8C + 5·H·D + 5·G·D + 3F + 34 = 73_728 + 33_024 + 34 = 106_786 tape values, + C input,
        // + C next input (copied back ahead), + 2F + C MLP gradients = 141_090 f32; dW of gate/up/down
        // 11008 × 4096 f32; bf16 casts T × (F + C).
        let block = 4096 * 141_090 * 4 + 45_088_768 * 4 + 4096 * (11008 + 4096) * 2;
        let head = 4096 * (3 * 4096 + 2 * 32000) * 4 + (32000 + 4096) * 4096 * 2;
        assert!(block > head);
        assert_eq!(bytes(&ph, "per-sequence working set"), block);
        let pinned = e2e_qp_pinned(&input("llama2-7b")).unwrap();
        assert_eq!(bytes(&pinned, "block checkpoints"), 32 * 4096 * 4096 * 4);
        assert_eq!(
            bytes(&pinned, "scale gradients, AdamW m, v"),
            32 * 3_162_112 * 12
        );
        assert_eq!(bytes(&pinned, "embedding"), 32000 * 4096 * 4);
    }

    #[test]
    fn e2e_terms_match_hand_counts_smollm2() {
        let mut p = input("smollm2-135m");
        p.quant = QuantConfig::new(3, 64).unwrap();
        let ph = e2e_qp(&p).unwrap();
        // 3 bits, ten values per word: K = 576 -> 58 words, K = 1536 -> 154 words per row.
        // Rows reading 576: q 576 + k 192 + v 192 + o 576 + gate 1536 + up 1536 = 4608; down: 576 rows.
        assert_eq!(
            bytes(&ph, "packed weights"),
            30 * (4608 * 58 + 576 * 154) * 4
        );
        // Zero points: 9 groups (1 word) per row reading 576, 24 groups (3 words) per down row.
        assert_eq!(bytes(&ph, "zeros"), 30 * (4608 + 576 * 3) * 4);
        // Tied embedding: the head is the one table of 49152 × 576, nothing on the host.
        assert_eq!(bytes(&ph, "head, norms"), 49152 * 576 * 4 + 61 * 576 * 4);
        assert!(e2e_qp_pinned(&p).unwrap().term("embedding").is_none());
        // The vocabulary is large against C: the head's logits are the larger working set.
        let head = 4096 * (3 * 576 + 2 * 49152) * 4 + (49152 + 4096) * 576 * 2;
        assert_eq!(bytes(&ph, "per-sequence working set"), head);
    }
}
