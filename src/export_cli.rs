//! `engine export`: the flags, parsed into a call of `eqat::io::export::export_checkpoint`.
use clap::Args;
use eqat::io::export::{export_checkpoint, ExportFormat};
use eqat::quant::pack::ZeroConvention;
use std::path::PathBuf;

#[derive(Args)]
pub struct ExportArgs {
    /// The checkpoint directory `engine train` wrote (finished).
    #[arg(long)]
    checkpoint: PathBuf,
    /// gptq (packed integers, loads in AutoGPTQ / GPTQModel / transformers / vLLM) or fake (dequantized f16).
    #[arg(long)]
    format: String,
    /// The new Hugging Face model directory (must not exist, or be empty).
    #[arg(long)]
    out: PathBuf,
    /// GPTQ zero points: v1 (stores z - 1; what AutoGPTQ, transformers and vLLM read) or v2 (stores z,
    /// `checkpoint_format: gptq_v2`, GPTQModel). v1 cannot hold a zero point of 0.
    #[arg(long, default_value = "v1")]
    zero_convention: String,
}

pub fn run(args: ExportArgs) -> eqat::Result<()> {
    let bad = |flag: &str, value: &str, allowed: &str| {
        eqat::Error::invalid(
            "engine export",
            format!("--{flag} {value}: expected {allowed}"),
        )
    };
    let zeros = match args.zero_convention.as_str() {
        "v1" => ZeroConvention::V1,
        "v2" => ZeroConvention::V2,
        other => return Err(bad("zero-convention", other, "v1 or v2")),
    };
    let format = match args.format.as_str() {
        "gptq" => ExportFormat::Gptq(zeros),
        "fake" => ExportFormat::Fake,
        other => return Err(bad("format", other, "gptq or fake")),
    };
    let t0 = std::time::Instant::now();
    let s = export_checkpoint(&args.checkpoint, format, &args.out)?;
    println!(
        "exported {} as {}: {} tensors, model.safetensors {:.1} MiB, {} scales, tokenizer {}; {:.2} s",
        args.checkpoint.display(),
        s.out.display(),
        s.tensors,
        s.bytes as f64 / (1 << 20) as f64,
        if s.e2e_scales { "E2E-QP" } else { "Block-AP" },
        s.tokenizer_files.join(", "),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
