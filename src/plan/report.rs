//! The printed plan of a GPU run (`engine plan`): each phase's terms against the GPU budget, the
//! BlockInputStore against the host budget, and the phase times from measured step figures only.
use super::gpu::{block_ap, e2e_qp, e2e_qp_pinned};
use super::host::resident;
use super::{human, prod, store_bytes, store_split, BlockCounts, Phase, PlanInput};
use crate::error::Result;
use std::fmt::Write;

/// Budgets and measured figures a plan is judged against.
#[derive(Clone, Copy, Debug)]
pub struct Budgets {
    pub gpu_mem: u64,
    pub host_mem: u64,
    /// Measured milliseconds of one Block-AP step (e.g. from `engine bench block-ap`).
    pub block_step_ms: Option<f64>,
    /// Measured milliseconds of one E2E-QP micro-step (one sequence of `e2e_seqlen` tokens).
    pub e2e_step_ms: Option<f64>,
}

/// The printed plan and, when it cannot fit, why and what to change (one line each).
#[derive(Clone, Debug)]
pub struct PlanReport {
    pub text: String,
    pub refusals: Vec<String>,
}

/// Host memory of a GPU run besides the store: the resident tensors as `LlamaModel` keeps them (f32) and two
/// blocks in f32 (the full-precision block read from the checkpoint, the frozen block dequantized to
/// propagate the quantized stream).
pub fn host_fixed(p: &PlanInput) -> Result<u64> {
    let b = BlockCounts::of(&p.cfg, p.quant)?;
    Ok(resident(p)?.bytes + prod(&[2, b.linear + b.norms, 4])?)
}

fn phase_table(out: &mut String, ph: &Phase, budget: u64) {
    let _ = writeln!(out, "{}", ph.name);
    for t in &ph.terms {
        let _ = writeln!(
            out,
            "  {:<32} {:>11}   {}",
            t.what,
            human(t.bytes),
            t.arithmetic
        );
    }
    let verdict = if ph.total() <= budget {
        "fits"
    } else {
        "DOES NOT FIT"
    };
    let _ = writeln!(
        out,
        "  {:<32} {:>11}   of {} GPU memory: {verdict}",
        "total",
        human(ph.total()),
        human(budget)
    );
}

fn hours(ms: f64) -> String {
    format!("{:.2} h", ms / 3.6e6)
}

pub fn render(p: &PlanInput, budgets: &Budgets) -> Result<PlanReport> {
    let cfg = &p.cfg;
    let mut out = String::new();
    let mut refusals = Vec::new();
    let steps_per_block = (p.train_size / p.batch.max(1)) as u64 * p.epochs as u64;
    let _ = writeln!(
        out,
        "model: {} blocks, hidden {}, FFN {}, heads {}/{} × {}, vocab {}{}; w{}g{}; compute {}",
        cfg.n_layers,
        cfg.hidden,
        cfg.intermediate,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.vocab,
        if cfg.tie_embeddings { ", tied" } else { "" },
        p.quant.wbits,
        p.quant.group_size,
        p.dtype.name()
    );
    let _ = writeln!(
        out,
        "Block-AP: {} + {} sequences × {} tokens, batch {}, {} epochs = {steps_per_block} steps per block; \
         E2E-QP: 1 × {} tokens per micro-step\n",
        p.train_size, p.val_size, p.seqlen, p.batch, p.epochs, p.e2e_seqlen
    );
    let bf16_hint = match p.dtype {
        super::ComputeDType::F32 => ", or --dtype bf16",
        super::ComputeDType::Bf16 => "",
    };
    let bap = block_ap(p)?;
    phase_table(&mut out, &bap, budgets.gpu_mem);
    if bap.total() > budgets.gpu_mem {
        refusals.push(format!(
            "Block-AP needs {} of GPU memory, over --gpu-mem {}: use a smaller --batch or --seqlen{}",
            human(bap.total()),
            human(budgets.gpu_mem),
            bf16_hint
        ));
    }
    out.push('\n');
    let e2e = e2e_qp(p)?;
    phase_table(&mut out, &e2e, budgets.gpu_mem);
    let pinned = e2e_qp_pinned(p)?;
    let _ = writeln!(out, "  {}:", pinned.name);
    for t in &pinned.terms {
        let _ = writeln!(
            out,
            "    {:<30} {:>11}   {}",
            t.what,
            human(t.bytes),
            t.arithmetic
        );
    }
    if e2e.total() > budgets.gpu_mem {
        // The model's own state (packed weights, zeros, scales with AdamW) does not shrink with the sequence.
        let model_state: u64 = e2e.terms[..3].iter().map(|t| t.bytes).sum();
        let hint = if model_state > budgets.gpu_mem {
            format!(
                "the packed model and its scales' optimizer state alone take {}: use a larger --group-size \
                 or a GPU with more memory",
                human(model_state)
            )
        } else {
            format!("use a smaller --e2e-seqlen{bf16_hint}")
        };
        refusals.push(format!(
            "E2E-QP needs {} of GPU memory, over --gpu-mem {}: {hint}",
            human(e2e.total()),
            human(budgets.gpu_mem)
        ));
    }

    let fixed = host_fixed(p)?;
    let store = store_bytes(p)?;
    let split = store_split(store, budgets.host_mem.saturating_sub(fixed));
    let _ = writeln!(
        out,
        "\nhost: {} resident embedding/head + two f32 blocks (read, frozen); BlockInputStore {} = 2 streams × \
         {} sequences × {} tokens × {} × 2 B (f16)",
        human(fixed),
        human(store),
        p.train_size + p.val_size,
        p.seqlen,
        cfg.hidden
    );
    let _ = writeln!(
        out,
        "  store in RAM {} (what --host-mem {} leaves), on disk {}",
        human(split.ram),
        human(budgets.host_mem),
        human(split.disk)
    );
    if split.disk > 0 {
        // Per block: the FP stream read and rewritten (propagation), `epochs` reads of both streams
        // (training), the quantized stream read and rewritten; the spilled share of each.
        let reads = split.disk * (p.epochs as u64 + 1);
        let rate = match budgets.block_step_ms {
            Some(ms) => format!(
                "; training reads {:.2} GB/s from disk at {ms} ms per step",
                (split.disk * p.epochs as u64) as f64 / (steps_per_block as f64 * ms * 1e-3) * 1e-9
            ),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "  disk offload per block: {} read ({} epochs of training + the two propagations), {} written{rate}",
            human(reads),
            p.epochs,
            human(split.disk)
        );
    }
    if fixed > budgets.host_mem {
        refusals.push(format!(
            "the host side needs {} besides the block inputs, over --host-mem {}: raise --host-mem",
            human(fixed),
            human(budgets.host_mem)
        ));
    }

    let steps = steps_per_block * cfg.n_layers as u64;
    match budgets.block_step_ms {
        Some(ms) => {
            let _ = writeln!(
                out,
                "\ntime: Block-AP {steps} steps ({steps_per_block} × {} blocks) × {ms} ms = {} (training steps \
                 only; stream propagation and I/O not included)",
                cfg.n_layers,
                hours(steps as f64 * ms)
            );
        }
        None => {
            let _ = writeln!(
                out,
                "\ntime: Block-AP {steps} steps: unknown (pass --block-step-ms, measured by engine bench block-ap)"
            );
        }
    }
    let micro = p.train_size as u64;
    let _ = match budgets.e2e_step_ms {
        Some(ms) => writeln!(
            out,
            "      E2E-QP {micro} micro-steps × {ms} ms = {}",
            hours(micro as f64 * ms)
        ),
        None => writeln!(
            out,
            "      E2E-QP {micro} micro-steps: unknown (pass --e2e-step-ms, a measured micro-step)"
        ),
    };
    Ok(PlanReport {
        text: out,
        refusals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{shape, ComputeDType};
    use crate::quant::fake_quant::QuantConfig;

    fn llama70b() -> PlanInput {
        PlanInput {
            cfg: shape("llama2-70b").unwrap(),
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

    #[test]
    fn llama2_70b_fits_80g_and_times_come_only_from_measurements() {
        let b = Budgets {
            gpu_mem: 80 << 30,
            host_mem: 64 << 30,
            block_step_ms: None,
            e2e_step_ms: None,
        };
        let r = render(&llama70b(), &b).unwrap();
        assert!(r.refusals.is_empty(), "{:?}", r.refusals);
        assert!(
            r.text.contains("unknown (pass --block-step-ms"),
            "{}",
            r.text
        );
        // 4096 / 2 × 2 epochs = 4096 steps per block, × 80 blocks × 66.6 ms = 6.06 h (gpu.md's compiled step).
        let r = render(
            &llama70b(),
            &Budgets {
                block_step_ms: Some(66.6),
                ..b
            },
        )
        .unwrap();
        assert!(
            r.text.contains("327680 steps") && r.text.contains("6.06 h"),
            "{}",
            r.text
        );
        // 64 GiB less the 8.33 GiB fixed part leaves 55.67 GiB of the 260 GiB store in RAM: 204.33 GiB on disk,
        // read 3 times per block (2 epochs + propagations); training reads 2 × 204.33 GiB = 438.7 GB in
        // 4096 × 66.6 ms = 272.8 s: 1.61 GB/s.
        assert!(
            r.text.contains("on disk 204.33 GiB")
                && r.text.contains("disk offload per block: 612.98 GiB read")
                && r.text.contains("204.33 GiB written")
                && r.text.contains("training reads 1.61 GB/s"),
            "{}",
            r.text
        );
        // Host: embedding + head 2 × 32000 × 8192 × 4 B = 1.95 GiB, two f32 blocks 2 × 855.6M × 4 B = 6.37 GiB.
        let fixed = host_fixed(&llama70b()).unwrap();
        assert_eq!(
            fixed,
            2 * 32000 * 8192 * 4 + 8192 * 4 + 2 * (855_638_016 + 16_384) * 4
        );
        // A 20 GiB GPU holds Block-AP (18.3 GiB) but not E2E-QP's 70B packed model; an 8 GiB host cannot stage two f32 blocks.
        let small = Budgets {
            gpu_mem: 20 << 30,
            host_mem: 8 << 30,
            ..b
        };
        let r = render(&llama70b(), &small).unwrap();
        assert_eq!(r.refusals.len(), 2, "{:?}", r.refusals);
        assert!(r.refusals[0].contains("E2E-QP") && r.refusals[0].contains("larger --group-size"));
        assert!(r.refusals[1].contains("raise --host-mem"));
        // At 24 GiB the model state (packed weights and zeros, f32 scales: 20.2 GiB) fits and the sequence is
        // what to cut.
        let r = render(
            &llama70b(),
            &Budgets {
                gpu_mem: 24 << 30,
                ..b
            },
        )
        .unwrap();
        assert!(
            r.refusals[0].contains("smaller --e2e-seqlen"),
            "{:?}",
            r.refusals
        );
    }
}
