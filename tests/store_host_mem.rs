//! The host-memory budget of the block-input store (`engine train --host-mem`): a store larger than its budget
//! keeps only the budget in RAM, spills the rest to its file, and the process's peak resident memory while it is
//! filled and read back grows by no more than the budget plus a fixed margin (one batch's conversion buffers).
//! Alone in its test binary, so that no other test's allocations move the process's peak.
use eqat::train::store::{BlockInputStore, Offload, StoreDType, Stream};
use eqat::Rng;

/// A field of /proc/self/status in bytes (VmRSS, VmHWM); None off Linux.
fn status_bytes(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = s
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

#[test]
fn a_store_over_its_budget_spills_to_disk_and_peak_rss_stays_within_the_budget() {
    const MIB: u64 = 1 << 20;
    // 32 samples × 512 tokens × 1024 × 2 B = 32 MiB per stream, 64 MiB in all; 8 MiB of budget.
    let (n, t, c) = (32, 512, 1024);
    let budget = 8 * MIB;
    // What a write or read of one batch of 2 samples allocates besides the store: the f32 values (4 MiB), their
    // f16 bytes (2 MiB) and the tensor read back (4 MiB), with room for the allocator's rounding.
    let margin = 16 * MIB;
    let dir = std::env::temp_dir().join(format!("eqat-store-rss-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let batch: Vec<Vec<f32>> = {
        let mut rng = Rng::new(11);
        (0..2).map(|_| rng.normal_vec(2 * t * c, 1.0)).collect()
    };
    // Resets the peak to the current RSS (Linux 4.0+); otherwise the peak so far is the baseline.
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let (Some(rss0), Some(hwm0)) = (status_bytes("VmRSS:"), status_bytes("VmHWM:")) else {
        println!("skipped: /proc/self/status not readable");
        return;
    };
    let base = if reset { rss0 } else { hwm0 };
    let mut store = BlockInputStore::new(
        n,
        t,
        c,
        StoreDType::F16,
        Offload::Budget {
            ram_bytes: budget,
            path: dir.join("spill.bin"),
        },
    )
    .unwrap();
    assert_eq!(store.placement(), (budget, 64 * MIB - budget));
    assert_eq!(
        std::fs::metadata(dir.join("spill.bin")).unwrap().len(),
        56 * MIB
    );
    for stream in [Stream::Fp, Stream::Quant] {
        for s in (0..n).step_by(2) {
            store.write(stream, s, &batch[s / 2 % 2]).unwrap();
        }
    }
    for stream in [Stream::Fp, Stream::Quant] {
        for s in (0..n).step_by(2) {
            let got = store.read(stream, s, 2).unwrap();
            let want = &batch[s / 2 % 2];
            // f16 keeps 11 significant bits, and steps of 2^-24 among its subnormals.
            let ok = got
                .f32s("t")
                .unwrap()
                .iter()
                .zip(want)
                .all(|(g, w)| (g - w).abs() <= w.abs() / 2048.0 + 2f32.powi(-25));
            assert!(ok, "{stream:?} samples {s}..{}", s + 2);
        }
    }
    let peak = status_bytes("VmHWM:").unwrap();
    let grew = peak.saturating_sub(base);
    println!(
        "store of {} MiB with a {} MiB budget: peak RSS grew {:.1} MiB (bound {} MiB; peak reset: {reset})",
        64,
        budget / MIB,
        grew as f64 / MIB as f64,
        (budget + margin) / MIB
    );
    assert!(
        grew <= budget + margin,
        "peak RSS grew {grew} bytes, over the budget {budget} + margin {margin}"
    );
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}
