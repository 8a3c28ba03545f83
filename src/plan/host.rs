//! Host memory of this CPU engine's `engine train`, and the check that refuses a run that cannot fit.
//!
//! Everything is f32 on the host. Block-AP holds the model's resident tensors (`LlamaModel`: embedding, head),
//! the trained block's parameters with gradients and AdamW moments, the full-precision block the pipeline reads
//! (kept while it trains), one step's tape, and the part of the BlockInputStore kept in RAM. The tape keeps
//! every op's output until `reset` and recycles buffers through its pool; per token it holds
//!   x, target, rmsnorm outputs, o, x1, down, output      8C    (inputs and the residual stream)
//!   q, k, v before and after reshape, q and k after RoPE, attention output before and after reshape
//!                                                          5·H·D + 5·G·D
//!   gate, up, swiglu output                                3F    and H log-sum-exps,
//! plus, in a training step, the backward's activation gradients (3F + 2C per token, as on the GPU) and the
//! seven fake-quantized weights with their gradients (2P). The propagation of the streams (no gradients)
//! runs `forward_batch` samples at once and keeps the same values per token without the target.
//! `cpu_tape_matches_the_measured_pool` checks this count against the pool of a real step.
//!
//! E2E-QP (no activation checkpointing on the CPU) holds both models' resident tensors, the packed model, its
//! scales with gradients and AdamW moments, the frozen tensors copied onto the tape, one sequence's
//! activations through every block, one dequantized linear and the logits with their gradient.
use super::gpu::{backward_scratch_per_token, packed_block_bytes};
use super::{count, human, prod, BlockCounts, Phase, PlanInput, StoreSplit, Term};
use crate::error::{Error, Result};

/// f32 values the CPU tape keeps per token for one block (forward values, no gradients, no target).
pub fn cpu_tape_per_token(p: &PlanInput) -> u64 {
    let c = &p.cfg;
    let (hd, gd) = (
        (c.n_heads * c.head_dim) as u64,
        (c.n_kv_heads * c.head_dim) as u64,
    );
    7 * c.hidden as u64 + 5 * hd + 5 * gd + 3 * c.intermediate as u64 + c.n_heads as u64
}

pub(crate) fn resident(p: &PlanInput) -> Result<Term> {
    let (v, c) = (p.cfg.vocab as u64, p.cfg.hidden as u64);
    let tables = if p.cfg.tie_embeddings { 1 } else { 2 };
    Ok(Term {
        what: "embedding, head (resident)",
        bytes: prod(&[tables, v, c, 4])? + c * 4,
        arithmetic: format!("{tables} × {v} × {c} × 4 B + final norm"),
    })
}

/// Block-AP on the CPU, without the store (see [`check_train`]).
pub fn block_ap_cpu(p: &PlanInput, forward_batch: usize) -> Result<Phase> {
    let b = BlockCounts::of(&p.cfg, p.quant)?;
    let params = b.linear + b.norms;
    let t = p.seqlen as u64;
    let n = prod(&[p.batch as u64, t])?;
    let per = cpu_tape_per_token(p);
    let train = prod(&[
        n,
        per + p.cfg.hidden as u64 + backward_scratch_per_token(p),
        4,
    ])? + prod(&[2, b.linear, 4])?;
    let propagate = prod(&[forward_batch as u64, t, per, 4])?;
    let pn = count(params);
    Ok(Phase {
        name: "Block-AP (this CPU engine)",
        terms: vec![
            resident(p)?,
            Term {
                what: "block params (+grad, AdamW)",
                bytes: prod(&[params, 4, 4])?,
                arithmetic: format!("{pn} × (value, grad, m, v) × 4 B"),
            },
            Term {
                what: "scales, zeros (+grad, AdamW)",
                bytes: prod(&[b.groups, 2, 4, 4])?,
                arithmetic: format!("{} groups × 2 × 4 × 4 B", count(b.groups)),
            },
            Term {
                what: "FP block being trained",
                bytes: prod(&[params, 4])?,
                arithmetic: format!("{pn} × 4 B"),
            },
            Term {
                what: "step tape",
                bytes: train.max(propagate),
                arithmetic: format!(
                    "max(train {n} tokens × ({per} + C + 3F + 2C) × 4 B + 2P × 4 B, \
                     propagate {forward_batch} × {t} tokens × {per} × 4 B)"
                ),
            },
        ],
    })
}

/// E2E-QP on the CPU, one sequence of `p.e2e_seqlen` tokens per micro-step.
pub fn e2e_qp_cpu(p: &PlanInput) -> Result<Phase> {
    let b = BlockCounts::of(&p.cfg, p.quant)?;
    let l = p.cfg.n_layers as u64;
    let (v, c, t) = (p.cfg.vocab as u64, p.cfg.hidden as u64, p.e2e_seqlen as u64);
    let groups = prod(&[b.groups, l])?;
    let res = resident(p)?;
    let per = cpu_tape_per_token(p);
    Ok(Phase {
        name: "E2E-QP (this CPU engine)",
        terms: vec![
            Term {
                what: "resident tensors ×3",
                bytes: res.bytes * 3,
                arithmetic: format!(
                    "FP model, quantized model and tape copy of ({})",
                    res.arithmetic
                ),
            },
            Term {
                what: "packed weights, zeros",
                bytes: prod(&[packed_block_bytes(p)?, l])? + groups,
                arithmetic: format!(
                    "{l} blocks at {} bits + {} zeros × 1 B",
                    p.quant.wbits,
                    count(groups)
                ),
            },
            Term {
                what: "scales ×2 (+grad, AdamW)",
                bytes: prod(&[groups, 5, 4])?,
                arithmetic: format!("{} groups × (model, tape, grad, m, v) × 4 B", count(groups)),
            },
            Term {
                what: "sequence activations",
                bytes: prod(&[l, t, per, 4])? + prod(&[t, backward_scratch_per_token(p), 4])?,
                arithmetic: format!("{l} blocks × {t} tokens × {per} × 4 B + one block's scratch"),
            },
            Term {
                what: "dequantized linear",
                bytes: prod(&[b.largest_linear, 4])?,
                arithmetic: format!("{} × 4 B", count(b.largest_linear)),
            },
            Term {
                what: "logits + grad",
                bytes: prod(&[t, v, 4, 2])? + prod(&[t, c, 4])?,
                arithmetic: format!("{t} × {v} × 4 B × 2 + final norm output"),
            },
        ],
    })
}

/// Where `engine train` keeps the BlockInputStore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorePolicy {
    /// All in RAM (`--offload ram`).
    Ram,
    /// All on disk (`--offload disk`).
    Disk,
    /// In RAM up to what the host budget leaves, the rest on disk (`--host-mem`).
    Budget,
}

/// Checks that `engine train` fits `host_budget` bytes and returns where the store's bytes go. Refuses, with
/// what to change, when Block-AP's working set, E2E-QP's (when `e2e`), or an all-RAM store does not fit.
pub fn check_train(
    p: &PlanInput,
    forward_batch: usize,
    e2e: bool,
    policy: StorePolicy,
    host_budget: u64,
) -> Result<StoreSplit> {
    let store = super::store_bytes(p)?;
    let bap = block_ap_cpu(p, forward_batch)?;
    let fixed = bap.total();
    let refuse = |msg: String| Err(Error::invalid("engine train", msg));
    if fixed > host_budget {
        return refuse(format!(
            "Block-AP needs {} of host memory besides its block inputs (one block's training at --batch {} × \
             --seqlen {}: {}), over the {} budget; use a smaller --batch or --seqlen, or raise --host-mem",
            human(fixed),
            p.batch,
            p.seqlen,
            bap.terms.iter().map(|t| format!("{} {}", t.what, human(t.bytes))).collect::<Vec<_>>().join(", "),
            human(host_budget)
        ));
    }
    if e2e {
        let e = e2e_qp_cpu(p)?;
        if e.total() > host_budget {
            return refuse(format!(
                "E2E-QP needs {} of host memory (sequences of {} tokens), over the {} budget; use --phase \
                 block-ap, a smaller --seqlen, or raise --host-mem",
                human(e.total()),
                p.e2e_seqlen,
                human(host_budget)
            ));
        }
    }
    let room = host_budget - fixed;
    let split = match policy {
        StorePolicy::Ram if store > room => {
            return refuse(format!(
                "the block inputs need {} in RAM and {} is left of the {} budget after Block-AP's {}; use \
                 --offload disk, --host-mem SIZE (RAM up to SIZE, the rest on disk), or fewer --train-size / \
                 --val-size / --seqlen",
                human(store),
                human(room),
                human(host_budget),
                human(fixed)
            ))
        }
        StorePolicy::Ram => super::store_split(store, store),
        StorePolicy::Disk => super::store_split(store, 0),
        StorePolicy::Budget => super::store_split(store, room),
    };
    Ok(split)
}

/// Available host memory: `MemAvailable` of /proc/meminfo, None where it cannot be read.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::Tape;
    use crate::model::llama::{block_forward, BlockVars, BlockWeights, LlamaConfig};
    use crate::ops::mse::mse;
    use crate::plan::{shape, ComputeDType};
    use crate::quant::fake_quant::QuantConfig;
    use crate::tensor::{rng::Rng, Tensor};

    fn input(cfg: LlamaConfig, batch: usize, seqlen: usize, group: i64) -> PlanInput {
        PlanInput {
            cfg,
            quant: QuantConfig::new(2, group).unwrap(),
            train_size: 64,
            val_size: 8,
            seqlen,
            batch,
            epochs: 2,
            dtype: ComputeDType::F32,
            e2e_seqlen: seqlen,
        }
    }

    /// The step tape's count is an upper bound of what the tape's pool really holds after training steps,
    /// and not a loose one.
    #[test]
    fn cpu_tape_matches_the_measured_pool() {
        for (c, f, h, g, d, b, t) in [
            (32, 48, 4, 2, 8, 2, 16),
            (64, 160, 4, 4, 16, 2, 32),
            (64, 176, 8, 2, 8, 3, 64),
            (48, 128, 6, 3, 8, 1, 40),
        ] {
            let cfg = LlamaConfig {
                hidden: c,
                intermediate: f,
                n_heads: h,
                n_kv_heads: g,
                head_dim: d,
                ..LlamaConfig::smollm2_135m()
            };
            let p = input(cfg.clone(), b, t, 8);
            let mut rng = Rng::new(c as u64 + t as u64);
            let w = BlockWeights::random(&cfg, &mut rng);
            let mut tape = Tape::new();
            let vars = BlockVars::register(&mut tape, &w, Some(p.quant)).unwrap();
            for _ in 0..3 {
                tape.reset();
                let x = tape.input(Tensor::randn(&[b, t, c], 1.0, &mut rng));
                let y = tape.input(Tensor::randn(&[b, t, c], 1.0, &mut rng));
                let out = block_forward(&mut tape, &cfg, &vars, x).unwrap();
                let loss = mse(&mut tape, out, y).unwrap();
                tape.zero_grad();
                tape.backward(loss).unwrap();
            }
            tape.reset();
            let held = tape.pool_held_values() as u64 * 4;
            // forward_batch 1 keeps the propagation term below the training one.
            let planned = block_ap_cpu(&p, 1)
                .unwrap()
                .term("step tape")
                .unwrap()
                .bytes;
            let ratio = planned as f64 / held as f64;
            assert!(
                (1.0..1.35).contains(&ratio),
                "C {c} F {f} H {h} G {g} T {t}: planned {planned} B, pool {held} B"
            );
        }
    }

    #[test]
    fn cpu_terms_match_hand_counts() {
        let p = input(shape("smollm2-135m").unwrap(), 2, 256, 64);
        let ph = block_ap_cpu(&p, 4).unwrap();
        let bytes = |w: &str| ph.term(w).unwrap().bytes;
        // Tied: one 49152 × 576 table and the final norm.
        assert_eq!(
            bytes("embedding, head (resident)"),
            49152 * 576 * 4 + 576 * 4
        );
        assert_eq!(bytes("block params (+grad, AdamW)"), 3_540_096 * 16);
        assert_eq!(bytes("FP block being trained"), 3_540_096 * 4);
        // Tape per token: 7C = 4032, 5·H·D = 2880, 5·G·D = 960, 3F = 4608, H = 9: 12_489 values.
        // Training: 512 tokens × (12_489 + 576 target + 5760 scratch) + 2P; propagation 4 × 256 × 12_489.
        let train = 512 * (12_489 + 576 + 5760) * 4 + 2 * 3_538_944 * 4;
        assert_eq!(bytes("step tape"), train.max(4 * 256 * 12_489 * 4));

        let e = e2e_qp_cpu(&input(shape("llama2-7b").unwrap(), 1, 512, 64)).unwrap();
        let bytes = |w: &str| e.term(w).unwrap().bytes;
        // Untied Llama-2-7B: (2 × 32000 × 4096 + 4096) × 4 B, three copies.
        assert_eq!(
            bytes("resident tensors ×3"),
            3 * (2 * 32000 * 4096 + 4096) * 4
        );
        // Per token: 7 × 4096 + 5 × 4096 + 5 × 4096 + 3 × 11008 + 32 = 102_688 values, 32 blocks.
        assert_eq!(
            bytes("sequence activations"),
            32 * 512 * 102_688 * 4 + 512 * (3 * 11008 + 2 * 4096) * 4
        );
        assert_eq!(bytes("scales ×2 (+grad, AdamW)"), 32 * 3_162_112 * 20);
    }

    #[test]
    fn train_check_refuses_with_what_to_change() {
        let p = input(shape("smollm2-135m").unwrap(), 2, 256, 64);
        let store = crate::plan::store_bytes(&p).unwrap();
        // 2 streams × 72 sequences × 256 tokens × 576 × 2 B = 42.5 MiB.
        assert_eq!(store, 2 * 72 * 256 * 576 * 2);
        let fixed = block_ap_cpu(&p, 4).unwrap().total();
        let e = check_train(&p, 4, false, StorePolicy::Budget, fixed - 1).unwrap_err();
        assert!(e.to_string().contains("smaller --batch"), "{e}");
        let e = check_train(&p, 4, false, StorePolicy::Ram, fixed + store / 2).unwrap_err();
        assert!(e.to_string().contains("--offload disk, --host-mem"), "{e}");
        let s = check_train(&p, 4, false, StorePolicy::Budget, fixed + store / 2).unwrap();
        assert_eq!((s.ram, s.disk), (store / 2, store - store / 2));
        let s = check_train(&p, 4, false, StorePolicy::Disk, fixed).unwrap();
        assert_eq!((s.ram, s.disk), (0, store));
        let s = check_train(&p, 4, false, StorePolicy::Ram, fixed + store).unwrap();
        assert_eq!((s.ram, s.disk), (store, 0));
        let e2e = e2e_qp_cpu(&p).unwrap().total();
        let e = check_train(&p, 4, true, StorePolicy::Disk, e2e - 1).unwrap_err();
        assert!(e.to_string().contains("--phase block-ap"), "{e}");
        assert!(available_memory().is_some_and(|m| m > 0));
    }
}
