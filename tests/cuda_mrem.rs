//! MREM-parallel Block-AP with its modules on the GPU (`--gpus 0,0`: two modules, each with its own context on
//! GPU 0, the same code path as one module per GPU): every block trains, and the losses track the CPU run of the
//! same K; the modules train in the GEMM mode of the Block-AP options' device. Without a GPU each test prints
//! `skipped: no CUDA device` and returns.
#![cfg(feature = "cuda")]

mod common;
mod cuda_common;

use common::{pipeline_options, random_model, windows, MemorySink, RandomModel};
use cuda_common::{device, Report};
use eqat::train::device::Device;
use eqat::train::mrem::{run_block_ap_mrem, MremOptions};
use eqat::train::store::Offload;

fn run(model: &RandomModel, devices: Vec<Device>) -> eqat::Result<MemorySink> {
    run_on(model, devices, Device::Cpu)
}

/// Two modules on `devices`, with `block_ap_device` as the Block-AP options' device.
fn run_on(
    model: &RandomModel,
    devices: Vec<Device>,
    block_ap_device: Device,
) -> eqat::Result<MemorySink> {
    let mrem = MremOptions {
        modules: 2,
        anneal_steps: None,
        queue_depth: 2,
        devices,
    };
    let mut sink = MemorySink::default();
    let mut opts = pipeline_options(Offload::Ram);
    opts.block_ap.device = block_ap_device;
    run_block_ap_mrem(
        model,
        &windows(2, 8),
        &windows(3, 2),
        &opts,
        &mrem,
        &mut sink,
        |_| {},
    )?;
    Ok(sink)
}

#[test]
fn modules_on_gpu_contexts_track_the_cpu_modules() {
    let Some(_shared) = device("mrem on the GPU") else {
        return;
    };
    let mut r = Report::new("mrem on the GPU");
    let model = random_model(1);
    let cpu = run(&model, Vec::new()).unwrap();
    let gpus = vec![
        Device::parse("cuda:0").unwrap(),
        Device::parse("cuda:0").unwrap(),
    ];
    let gpu = run(&model, gpus).unwrap();
    r.expect(
        "every block trained",
        gpu.0.len() == cpu.0.len() && gpu.0.len() == 3,
    );
    for (i, (g, c)) in gpu.0.iter().zip(&cpu.0).enumerate() {
        r.expect(
            &format!("block {i}: finite losses"),
            g.step_losses
                .iter()
                .chain(&g.val_losses)
                .all(|l| l.is_finite()),
        );
        // The first step sees the same inputs and parameters on both (f32 sums in another order): 1e-4. Later
        // steps may round a weight to the other integer (straight-through), so the end is compared at 5%.
        let first: Vec<f64> = c.step_losses[..1].iter().map(|&l| l as f64).collect();
        r.check_tol(
            &format!("block {i}: first step loss"),
            &g.step_losses[..1],
            &first,
            0.0,
            1e-4,
        );
        let val: Vec<f64> = c.val_losses.iter().map(|&l| l as f64).collect();
        r.check_tol(
            &format!("block {i}: validation losses"),
            &g.val_losses,
            &val,
            0.0,
            5e-2,
        );
        eprintln!(
            "block {i}: steps {} gpu first/last {:.6}/{:.6} cpu {:.6}/{:.6}; val gpu {:?} cpu {:?}",
            g.step_losses.len(),
            g.step_losses[0],
            g.step_losses.last().unwrap(),
            c.step_losses[0],
            c.step_losses.last().unwrap(),
            g.val_losses,
            c.val_losses
        );
    }
    let mismatch = run(&model, vec![Device::parse("cuda:0").unwrap()]);
    r.expect(
        "one device for two modules is an error naming both counts",
        matches!(&mismatch, Err(e) if e.to_string().contains("1 devices for 2 modules")),
    );
    r.finish();
}

/// `engine train --dtype bf16 --gpus 0,1` puts only the Block-AP device in the bf16 mode; each module's context
/// must follow it. Compared: the first step loss of each module's first block (blocks 0 and 2; a forward on FP
/// inputs, free of the attention backward's atomics, so bit-reproducible). Fresh module contexts (f32 by default)
/// under a bf16 Block-AP device give the losses of module contexts put in the bf16 mode by hand, not the f32 run's.
#[test]
fn modules_train_in_the_gemm_mode_of_the_block_ap_device() {
    let Some(_shared) = device("mrem gemm mode") else {
        return;
    };
    let mut r = Report::new("mrem gemm mode");
    let model = random_model(2);
    let gpus = || {
        vec![
            Device::parse("cuda:0").unwrap(),
            Device::parse("cuda:0").unwrap(),
        ]
    };
    let first_losses = |sink: &MemorySink| [sink.0[0].step_losses[0], sink.0[2].step_losses[0]];
    let block_ap_bf16 = Device::parse("cuda:0").unwrap();
    block_ap_bf16.set_matmul_bf16(true).unwrap();
    let inherited = first_losses(&run_on(&model, gpus(), block_ap_bf16.clone()).unwrap());
    let by_hand = gpus();
    by_hand
        .iter()
        .for_each(|d| d.set_matmul_bf16(true).unwrap());
    let by_hand = first_losses(&run_on(&model, by_hand, block_ap_bf16).unwrap());
    let f32_run = first_losses(&run_on(&model, gpus(), Device::parse("cuda:0").unwrap()).unwrap());
    eprintln!(
        "first step losses: inherited {inherited:?}, bf16 by hand {by_hand:?}, f32 {f32_run:?}"
    );
    r.expect(
        "bf16 Block-AP device: the modules' losses are those of bf16 modules",
        inherited == by_hand,
    );
    r.expect(
        "and not those of f32 modules (both blocks differ)",
        inherited[0] != f32_run[0] && inherited[1] != f32_run[1],
    );
    r.finish();
}
