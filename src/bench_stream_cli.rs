//! `engine bench block-ap --stream`: its flags and printout (the work is in `eqat::bench::stream`).
use clap::Args;
use eqat::bench::BlockApBench;

#[derive(Args)]
pub struct StreamArgs {
    /// Run the streamed benchmark (GPU only).
    #[arg(long)]
    pub stream: bool,
    /// Blocks of the synthetic model (streamed).
    #[arg(long, default_value_t = 3)]
    pub blocks: usize,
    /// Calibration sequences in the host store (streamed; one epoch of samples / batch steps per block).
    #[arg(long, default_value_t = 16)]
    pub samples: usize,
    /// Pinned host memory for the store (K, M, G, T binary); the rest goes to a file in --spill-dir.
    #[arg(long, default_value = "64G")]
    pub host_mem: String,
    /// Directory of the spill file (default: the system's temporary directory).
    #[arg(long)]
    pub spill_dir: Option<std::path::PathBuf>,
}

#[cfg(not(feature = "cuda"))]
pub fn bench_stream(_b: BlockApBench, _a: &StreamArgs) -> eqat::Result<()> {
    Err(eqat::Error::invalid(
        "engine bench",
        "--stream needs a GPU: this engine was built without the `cuda` feature",
    ))
}

#[cfg(feature = "cuda")]
pub fn bench_stream(b: BlockApBench, a: &StreamArgs) -> eqat::Result<()> {
    use eqat::bench::describe_peak;
    use eqat::bench::stream::{run_block_ap_stream, StreamBench};
    let gib = |x: f64| x / (1u64 << 30) as f64;
    let spill = a
        .spill_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("eqat-bench-stream-{}.bin", std::process::id()));
    let sb = StreamBench {
        blocks: a.blocks,
        samples: a.samples,
        host_mem: eqat::plan::parse_size(&a.host_mem)?,
        spill,
        base: b,
    };
    let r = run_block_ap_stream(&sb)?;
    let base = &sb.base;
    println!(
        "block-ap {:?} w{}g{} batch {} seqlen {} streamed on {} ({:?} GEMMs): {} blocks, {} samples",
        base.shape,
        base.quant.wbits,
        base.quant.group_size,
        base.batch,
        base.seqlen,
        r.device,
        base.dtype,
        sb.blocks,
        sb.samples
    );
    println!(
        "  PCIe (pinned, 256 MiB copies): host->device {:.1} GB/s, device->host {:.1} GB/s",
        r.h2d_gbps, r.d2h_gbps
    );
    println!(
        "  store: {:.2} GiB pinned, {:.2} GiB in the spill file (--host-mem {})",
        gib(r.placement.0 as f64),
        gib(r.placement.1 as f64),
        a.host_mem
    );
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|t| format!("{t:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("  resident step ms: {}", fmt(&r.resident_ms));
    println!("  streamed step ms: {}", fmt(&r.streamed_ms));
    for (i, (first, last)) in r.block_losses.iter().enumerate() {
        println!("  block {i}: loss first {first:.6e} last {last:.6e}");
    }
    let batch_mib = r.copy_bytes.first().copied().unwrap_or(0) as f64 / (1u64 << 20) as f64;
    let copy_med = {
        let mut v = r.copy_ms.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    println!(
        "  batch copies: {batch_mib:.1} MiB each, median {copy_med:.2} ms on the copy stream, {:.1} GB/s \
         achieved",
        r.copy_gbps()
    );
    println!(
        "  propagation passes ms: {}; weight prefetch {:.2} GiB per block, host waited {} ms at block switches",
        fmt(&r.propagate_ms),
        gib(r.weight_bytes as f64),
        fmt(&r.weight_wait_ms)
    );
    let (res, st) = (r.resident_median(), r.streamed_median());
    println!(
        "  median step: resident {res:.2} ms, streamed {st:.2} ms (streamed/resident {:.3}; the copy \
         ({copy_med:.2} ms) is {:.0}% hidden)",
        st / res,
        100.0 * (1.0 - ((st - res) / copy_med).clamp(0.0, 1.0))
    );
    println!(
        "  streamed phase: GPU {}, {:.2} GiB used on the device at the end (cuMemGetInfo); host peak RSS \
         {:.2} GiB",
        describe_peak(r.peak_gpu, Some(r.peak_reserved)),
        gib(r.device_used as f64),
        gib(r.peak_rss as f64)
    );
    Ok(())
}
