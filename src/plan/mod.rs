//! Memory plans: what each phase of EfficientQAT holds, term by term, computed from the model's shapes before
//! anything is loaded, so that a run that cannot fit is refused at once with what to change.
//!
//! Glossary (as in lib.rs): C hidden, F intermediate, H query heads, G key-value heads, D head dim, L blocks,
//! V vocabulary, N tokens per step (batch × seqlen). P = the seven linears' weights of one block,
//! Gr = their (scale, zero) groups, d = bytes per value of the compute dtype (bf16 2, f32 4).
//!
//! - [`gpu`]: a GPU run — Block-AP (one block on the device), E2E-QP (the packed model on the device).
//! - [`host`]: this CPU engine's `engine train`, whose whole working set is host memory.
//! - [`BlockInputStore`](crate::train::store::BlockInputStore) on the host for both: RAM up to a budget, the
//!   rest on disk ([`store_split`]).
//!
//! Every term is a pure function of the shapes; the unit tests check each one against a hand count.
pub mod gpu;
pub mod host;
pub mod report;

use crate::error::{Error, Result};
use crate::model::llama::LlamaConfig;
use crate::ops::rope::RopeLayout;
use crate::quant::fake_quant::QuantConfig;

/// The dtype activations and fake-quantized weights are computed in (master weights are always f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComputeDType {
    Bf16,
    F32,
}

impl ComputeDType {
    pub fn bytes(self) -> u64 {
        match self {
            ComputeDType::Bf16 => 2,
            ComputeDType::F32 => 4,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            ComputeDType::Bf16 => "bf16",
            ComputeDType::F32 => "f32",
        }
    }
}

/// Everything a plan depends on.
#[derive(Clone, Debug)]
pub struct PlanInput {
    pub cfg: LlamaConfig,
    pub quant: QuantConfig,
    /// Block-AP calibration sequences (recipe 4096) and validation sequences (recipe 64).
    pub train_size: usize,
    pub val_size: usize,
    /// Block-AP tokens per sequence (recipe 2048) and sequences per step (recipe 2).
    pub seqlen: usize,
    pub batch: usize,
    pub epochs: usize,
    pub dtype: ComputeDType,
    /// E2E-QP tokens per sequence; one sequence per micro-step (the global batch is gradient accumulation).
    pub e2e_seqlen: usize,
}

/// One line of a plan: what it is, its size, and the arithmetic that gives the size.
#[derive(Clone, Debug, PartialEq)]
pub struct Term {
    pub what: &'static str,
    pub bytes: u64,
    pub arithmetic: String,
}

/// The terms one phase holds at its peak, on one device.
#[derive(Clone, Debug)]
pub struct Phase {
    pub name: &'static str,
    pub terms: Vec<Term>,
}

impl Phase {
    pub fn total(&self) -> u64 {
        self.terms.iter().map(|t| t.bytes).sum()
    }
    /// The term named `what` (tests and reports).
    pub fn term(&self, what: &str) -> Option<&Term> {
        self.terms.iter().find(|t| t.what == what)
    }
}

/// The product of `factors`, or an error when it overflows u64 (absurd sizes from the command line).
pub fn prod(factors: &[u64]) -> Result<u64> {
    factors
        .iter()
        .try_fold(1u64, |acc, &x| acc.checked_mul(x))
        .ok_or_else(|| Error::invalid("plan", format!("{factors:?}: the size overflows u64")))
}

/// Parameter counts of one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockCounts {
    /// Weights of the seven linears (P).
    pub linear: u64,
    /// The two RMSNorm weights (2C).
    pub norms: u64,
    /// (scale, zero) groups of the seven linears (Gr).
    pub groups: u64,
    /// The largest linear's weights (the dequantization scratch of E2E-QP).
    pub largest_linear: u64,
}

impl BlockCounts {
    pub fn of(cfg: &LlamaConfig, quant: QuantConfig) -> Result<BlockCounts> {
        let mut c = BlockCounts {
            linear: 0,
            norms: 2 * cfg.hidden as u64,
            groups: 0,
            largest_linear: 0,
        };
        for (_, n, k) in cfg.linear_shapes() {
            let w = prod(&[n as u64, k as u64])?;
            c.linear += w;
            c.largest_linear = c.largest_linear.max(w);
            c.groups += prod(&[n as u64, (k / quant.group_len(k)?) as u64])?;
        }
        Ok(c)
    }
}

/// Where the BlockInputStore's bytes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreSplit {
    pub total: u64,
    pub ram: u64,
    pub disk: u64,
}

/// Bytes of the BlockInputStore: FP and quantized streams of every training and validation sequence, f16.
pub fn store_bytes(p: &PlanInput) -> Result<u64> {
    let samples = (p.train_size + p.val_size) as u64;
    prod(&[2, samples, p.seqlen as u64, p.cfg.hidden as u64, 2])
}

/// The store kept in RAM up to `ram_budget` bytes, the rest on disk.
pub fn store_split(total: u64, ram_budget: u64) -> StoreSplit {
    let ram = total.min(ram_budget);
    StoreSplit {
        total,
        ram,
        disk: total - ram,
    }
}

/// The shapes `engine plan --shape NAME` knows, from the models' config.json.
pub const SHAPES: [&str; 4] = ["smollm2-135m", "llama2-7b", "llama3-8b", "llama2-70b"];

pub fn shape(name: &str) -> Result<LlamaConfig> {
    let llama =
        |hidden, intermediate, n_heads, n_kv_heads, n_layers, vocab, rope_base| LlamaConfig {
            hidden,
            intermediate,
            n_heads,
            n_kv_heads,
            head_dim: hidden / n_heads,
            n_layers,
            vocab,
            rms_eps: 1e-5,
            rope_base,
            rope_layout: RopeLayout::HalfSplit,
            tie_embeddings: false,
            attn_bias: false,
        };
    Ok(match name {
        "smollm2-135m" => LlamaConfig::smollm2_135m(),
        "llama2-7b" => llama(4096, 11008, 32, 32, 32, 32000, 10_000.0),
        "llama3-8b" => llama(4096, 14336, 32, 8, 32, 128_256, 500_000.0),
        "llama2-70b" => llama(8192, 28672, 64, 8, 80, 32000, 10_000.0),
        other => {
            return Err(Error::invalid(
                "plan",
                format!("unknown shape {other}; known: {}", SHAPES.join(", ")),
            ))
        }
    })
}

/// Parses a size such as `80G`, `64GiB`, `512M` or `1073741824`; K, M, G and T are binary (KiB ... TiB).
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = || {
        Error::invalid(
            "size",
            format!("{s:?}: expected a number with an optional K, M, G or T suffix (binary: 80G = 80 GiB)"),
        )
    };
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let x: f64 = num.trim().parse().map_err(|_| bad())?;
    let bytes = x * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// `bytes` in GiB with two decimals (MiB below one GiB).
pub fn human(bytes: u64) -> String {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.2} GiB")
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// A count with an SI suffix (855.6M), for the arithmetic column.
pub fn count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}G", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 10_000 => format!("{:.1}k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(wbits: u32, g: i64) -> QuantConfig {
        QuantConfig::new(wbits, g).unwrap()
    }

    #[test]
    fn block_counts_match_hand_counts() {
        // SmolLM2-135M: q, o 576×576; k, v 192×576 (3 kv heads × 64); gate, up 1536×576; down 576×1536.
        let c = BlockCounts::of(&shape("smollm2-135m").unwrap(), q(2, 64)).unwrap();
        assert_eq!(c.linear, 2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576);
        assert_eq!(c.linear, 3_538_944);
        assert_eq!(c.norms, 2 * 576);
        // Groups along the input dim: q, k, v, gate, up read 576 = 9 groups; o reads 576 = 9; down 1536 = 24.
        assert_eq!(
            c.groups,
            (576 + 192 + 192 + 576 + 1536 + 1536) * 9 + 576 * 24
        );
        assert_eq!(c.largest_linear, 1536 * 576);
        // Llama-2-7B: four 4096×4096 attention linears, three 11008×4096 MLP linears.
        let c = BlockCounts::of(&shape("llama2-7b").unwrap(), q(2, 64)).unwrap();
        assert_eq!(c.linear, 4 * 4096 * 4096 + 3 * 11008 * 4096);
        assert_eq!(c.linear, 202_375_168);
        assert_eq!(c.groups, 202_375_168 / 64);
        // Per-channel: one group per output row: 4 × 4096 + 2 × 11008 + 4096.
        let c = BlockCounts::of(&shape("llama2-7b").unwrap(), q(2, -1)).unwrap();
        assert_eq!(c.groups, 4 * 4096 + 2 * 11008 + 4096);
        // A group that does not divide K is an error naming it.
        assert!(BlockCounts::of(&shape("smollm2-135m").unwrap(), q(2, 100)).is_err());
    }

    #[test]
    fn store_split_and_sizes() {
        let p = PlanInput {
            cfg: shape("llama2-70b").unwrap(),
            quant: q(2, 64),
            train_size: 4096,
            val_size: 64,
            seqlen: 2048,
            batch: 2,
            epochs: 2,
            dtype: ComputeDType::Bf16,
            e2e_seqlen: 4096,
        };
        // 2 streams × 4160 sequences × 2048 tokens × 8192 hidden × 2 bytes = 260 GiB.
        let total = store_bytes(&p).unwrap();
        assert_eq!(total, 2 * 4160 * 2048 * 8192 * 2);
        assert_eq!(total, 260 << 30);
        let s = store_split(total, 60 << 30);
        assert_eq!((s.ram, s.disk), (60 << 30, 200 << 30));
        assert_eq!(
            store_split(100, 1000),
            StoreSplit {
                total: 100,
                ram: 100,
                disk: 0
            }
        );
        let huge = PlanInput {
            train_size: usize::MAX / 2,
            ..p
        };
        assert!(store_bytes(&huge)
            .unwrap_err()
            .to_string()
            .contains("overflow"));
    }

    #[test]
    fn sizes_parse_as_binary_units() {
        assert_eq!(parse_size("80G").unwrap(), 80 << 30);
        assert_eq!(parse_size("64GiB").unwrap(), 64 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5T").unwrap(), 3 << 39);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        for bad in ["", "G", "-1G", "12X", "nanG"] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.contains("K, M, G or T"), "{bad}: {e}");
        }
        assert_eq!(human(3 << 29), "1.50 GiB");
        assert_eq!(human(5 << 20), "5.0 MiB");
    }
}
