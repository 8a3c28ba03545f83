//! AdamW's fused fake-quant step (`fake_quant_adamw_f32`, src/train/adamw/fake_quant.rs) on the GPU: bit for bit
//! the three kernels it replaces, close to the CPU composition, and Block-AP trained fused and unfused gives
//! identical losses and parameters. Without a GPU each test prints `skipped: ..`.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use eqat::gpu::GpuContext;
use eqat::model::llama::BlockWeights;
use eqat::ops::linear::cast_bf16_cuda;
use eqat::quant::fake_quant::{
    fake_quant_bwd_cpu, fake_quant_bwd_cuda, fake_quant_fwd_bf16_cuda, fake_quant_fwd_cpu,
    init_minmax, QuantConfig,
};
use eqat::testing::to_f64;
use eqat::train::adamw::{adamw_fake_quant_cuda, adamw_update_cpu, adamw_update_cuda, AdamWCoefs};
use eqat::train::block_ap::{train_block, BlockApOptions, TensorPairs};
use eqat::train::device::Device;
use eqat::{Rng, Tensor};
use half::bf16;

/// One group-wise problem: w [n, k], scales/zeros [n, k/g], moments, dŵ (bf16 values, as the dŵ GEMM writes
/// them), and the coefficients of a step.
struct Problem {
    n: usize,
    k: usize,
    g: usize,
    qmax: f32,
    w: Vec<f32>,
    wm: Vec<f32>,
    wv: Vec<f32>,
    dwq: Vec<f32>,
    s: Vec<f32>,
    sm: Vec<f32>,
    sv: Vec<f32>,
    z: Vec<f32>,
    zm: Vec<f32>,
    zv: Vec<f32>,
    cw: AdamWCoefs,
    cq: AdamWCoefs,
}

impl Problem {
    fn new(n: usize, k: usize, g: usize, wbits: u32, seed: u64) -> Problem {
        let mut rng = Rng::new(seed);
        let cfg = QuantConfig::new(wbits, g as i64).unwrap();
        let w = rng.normal_vec(n * k, 0.05);
        let (s0, z0) = init_minmax(&Tensor::from_vec(&[n, k], w.clone()).unwrap(), cfg).unwrap();
        let ng = n * k / g;
        // Scales off their min-max values and zeros off the integers, so that rounding and clamping both act.
        let s: Vec<f32> = s0
            .to_f32_vec()
            .iter()
            .map(|&s| s * (1.0 + 0.05 * rng.normal() as f32))
            .collect();
        let z: Vec<f32> = z0
            .to_f32_vec()
            .iter()
            .map(|&z| z + 0.4 * rng.normal() as f32)
            .collect();
        let moments = |rng: &mut Rng, len: usize, scale: f64| {
            let m = rng.normal_vec(len, scale);
            let v = rng
                .normal_vec(len, scale)
                .iter()
                .map(|x| x * x)
                .collect::<Vec<f32>>();
            (m, v)
        };
        let (wm, wv) = moments(&mut rng, n * k, 1e-3);
        let (sm, sv) = moments(&mut rng, ng, 1e-2);
        let (zm, zv) = moments(&mut rng, ng, 1e-2);
        Problem {
            n,
            k,
            g,
            qmax: cfg.qmax(),
            dwq: rng
                .normal_vec(n * k, 1e-2)
                .iter()
                .map(|&x| bf16::from_f32(x).to_f32())
                .collect(),
            w,
            wm,
            wv,
            s,
            sm,
            sv,
            z,
            zm,
            zv,
            // Step 3 (bias corrections act), a weight decay on w to exercise it (Block-AP's is 0).
            cw: AdamWCoefs::new(2e-5 * 0.7, 0.1, 0.9, 0.999, 1e-8, 3),
            cq: AdamWCoefs::new(1e-4 * 0.7, 0.0, 0.9, 0.999, 1e-8, 3),
        }
    }
}

/// (w, wm, wv, s, sm, sv, z, zm, zv, ŵ_b widened) after one step.
type After = [Vec<f32>; 10];

fn fused_gpu(ctx: &std::sync::Arc<GpuContext>, p: &Problem) -> After {
    let [mut w, mut wm, mut wv, mut s, mut sm, mut sv, mut z, mut zm, mut zv] =
        [&p.w, &p.wm, &p.wv, &p.s, &p.sm, &p.sv, &p.z, &p.zm, &p.zv].map(|v| up(ctx, v));
    let mut wq = ctx.alloc_bf16(p.n * p.k).unwrap();
    adamw_fake_quant_cuda(
        &mut w,
        (&mut wm, &mut wv),
        &cast_bf16_cuda(&up(ctx, &p.dwq)).unwrap(),
        &mut s,
        (&mut sm, &mut sv),
        &mut z,
        (&mut zm, &mut zv),
        &mut wq,
        (p.g, p.qmax),
        &p.cw,
        &p.cq,
    )
    .unwrap();
    let d = [&w, &wm, &wv, &s, &sm, &sv, &z, &zm, &zv].map(down);
    let [a, b, c, e, f, g, h, i, j] = d;
    [a, b, c, e, f, g, h, i, j, wq.to_f32_vec().unwrap()]
}

/// The kernels the fused step replaces, on the GPU: fake-quant backward (from the bf16 dŵ; the f32 kernel on the
/// same values must give the same bits), three AdamW updates, bf16 forward.
fn unfused_gpu(ctx: &std::sync::Arc<GpuContext>, p: &Problem, r: &mut Report) -> After {
    let [mut w, mut wm, mut wv, mut s, mut sm, mut sv, mut z, mut zm, mut zv] =
        [&p.w, &p.wm, &p.wv, &p.s, &p.sm, &p.sv, &p.z, &p.zm, &p.zv].map(|v| up(ctx, v));
    let ng = p.s.len();
    let (mut dw, mut ds, mut dz) = (
        ctx.alloc(p.n * p.k).unwrap(),
        ctx.alloc(ng).unwrap(),
        ctx.alloc(ng).unwrap(),
    );
    let dwq = up(ctx, &p.dwq);
    let dwq_b = cast_bf16_cuda(&dwq).unwrap();
    fake_quant_bwd_cuda(
        Some(&mut dw),
        Some(&mut ds),
        Some(&mut dz),
        &dwq_b,
        &w,
        &s,
        &z,
        p.g,
        p.qmax,
    )
    .unwrap();
    let (mut dw32, mut ds32, mut dz32) = (
        ctx.alloc(p.n * p.k).unwrap(),
        ctx.alloc(ng).unwrap(),
        ctx.alloc(ng).unwrap(),
    );
    let (w0, s0, z0) = (&w, &s, &z);
    fake_quant_bwd_cuda(
        Some(&mut dw32),
        Some(&mut ds32),
        Some(&mut dz32),
        &dwq,
        w0,
        s0,
        z0,
        p.g,
        p.qmax,
    )
    .unwrap();
    let bits = |b: &eqat::gpu::GpuBuf| down(b).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let same = bits(&dw) == bits(&dw32) && bits(&ds) == bits(&ds32) && bits(&dz) == bits(&dz32);
    let tag = format!("{}x{} g{}", p.n, p.k, p.g);
    r.expect(
        &format!("{tag}: fake_quant_bwd from bf16 == from f32, bit for bit"),
        same,
    );
    adamw_update_cuda(&mut w, &dw, &mut wm, &mut wv, &p.cw).unwrap();
    adamw_update_cuda(&mut s, &ds, &mut sm, &mut sv, &p.cq).unwrap();
    adamw_update_cuda(&mut z, &dz, &mut zm, &mut zv, &p.cq).unwrap();
    let mut wq = ctx.alloc_bf16(p.n * p.k).unwrap();
    fake_quant_fwd_bf16_cuda(&mut wq, &w, &s, &z, p.g, p.qmax).unwrap();
    let d = [&w, &wm, &wv, &s, &sm, &sv, &z, &zm, &zv].map(down);
    let [a, b, c, e, f, g, h, i, j] = d;
    [a, b, c, e, f, g, h, i, j, wq.to_f32_vec().unwrap()]
}

/// The same composition on the CPU (`_cpu` kernels), ŵ rounded to bf16 to nearest even.
fn composition_cpu(p: &Problem) -> After {
    let (mut w, mut wm, mut wv) = (p.w.clone(), p.wm.clone(), p.wv.clone());
    let (mut s, mut sm, mut sv) = (p.s.clone(), p.sm.clone(), p.sv.clone());
    let (mut z, mut zm, mut zv) = (p.z.clone(), p.zm.clone(), p.zv.clone());
    let ng = s.len();
    let (mut dw, mut ds, mut dz) = (vec![0.0; w.len()], vec![0.0; ng], vec![0.0; ng]);
    fake_quant_bwd_cpu(
        Some(&mut dw),
        Some(&mut ds),
        Some(&mut dz),
        &p.dwq,
        &w,
        &s,
        &z,
        p.g,
        p.qmax,
    );
    adamw_update_cpu(&mut w, &dw, &mut wm, &mut wv, &p.cw);
    adamw_update_cpu(&mut s, &ds, &mut sm, &mut sv, &p.cq);
    adamw_update_cpu(&mut z, &dz, &mut zm, &mut zv, &p.cq);
    let mut wq = vec![0.0; w.len()];
    fake_quant_fwd_cpu(&mut wq, &w, &s, &z, p.g, p.qmax);
    let wq = wq.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
    [w, wm, wv, s, sm, sv, z, zm, zv, wq]
}

const NAMES: [&str; 10] = [
    "w",
    "m(w)",
    "v(w)",
    "scales",
    "m(scales)",
    "v(scales)",
    "zeros",
    "m(zeros)",
    "v(zeros)",
    "ŵ_b",
];

#[test]
fn fused_step_equals_the_kernels_it_replaces_and_tracks_the_cpu() {
    let Some(ctx) = device("adamw_fake_quant") else {
        return;
    };
    let mut r = Report::new("adamw_fake_quant");
    // (n, k, g, bits): the pair path (g a multiple of 64) and the lane-per-element path, odd row counts.
    for (i, &(n, k, g, bits)) in [
        (8, 128, 64, 2),
        (5, 256, 128, 3),
        (7, 96, 32, 4),
        (3, 48, 16, 2),
        (3, 1024, 512, 4),
        (3, 768, 256, 3),
        (33, 4096, 64, 2),
    ]
    .iter()
    .enumerate()
    {
        let p = Problem::new(n, k, g, bits, 40 + i as u64);
        let (fused, unfused, cpu) = (
            fused_gpu(&ctx, &p),
            unfused_gpu(&ctx, &p, &mut r),
            composition_cpu(&p),
        );
        for (j, name) in NAMES.iter().enumerate() {
            let same = fused[j]
                .iter()
                .zip(&unfused[j])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            r.expect(
                &format!("{n}x{k} g{g} w{bits}: {name} fused == unfused bit for bit"),
                same,
            );
            if j == 9 {
                continue;
            }
            // CPU: the same formulas without FMA contraction and the groups' sums in another order; AdamW's
            // normalised step makes a 1e-6 relative difference in ds a far smaller one in the scale.
            r.check_tol(
                &format!("{n}x{k} g{g}: {name} vs cpu"),
                &fused[j],
                &to_f64(&cpu[j]),
                1e-9,
                1e-5,
            );
        }
        // ŵ_b: a scale 1e-6 off can flip a bf16 rounding (one bf16 ulp, 2^-8 relative) or, rarely, a rint at .5
        // (one quantization step): every element within one ulp, at most 1 in 10^4 a step apart.
        let (mut far, total) = (0usize, fused[9].len());
        for ((&a, &b), s) in fused[9]
            .iter()
            .zip(&cpu[9])
            .zip(p.s.iter().flat_map(|&s| std::iter::repeat_n(s, g)))
        {
            let d = (a - b).abs();
            if d > b.abs() * 2f32.powi(-7) + 1e-30 {
                far += 1;
                r.expect(
                    "a ŵ_b difference beyond one ulp is one quantization step",
                    d <= 1.1 * s.abs() + 1e-6,
                );
            }
        }
        r.expect(
            &format!("{n}x{k}: {far} of {total} ŵ_b a step apart"),
            far * 10_000 <= total,
        );
    }
    r.finish();
}

#[test]
fn block_ap_fused_and_unfused_train_identically() {
    let Some(_) = device("block_ap fused") else {
        return;
    };
    let mut r = Report::new("block_ap fused vs unfused");
    for (intermediate, g) in [(96, 16), (128, 64)] {
        let cfg = tiny_block(intermediate);
        let mut rng = Rng::new(77);
        let w = BlockWeights::random(&cfg, &mut rng);
        let inputs = Tensor::randn(&[8, 32, cfg.hidden], 1.0, &mut rng);
        let targets = Tensor::randn(&[8, 32, cfg.hidden], 1.0, &mut rng);
        let pairs = TensorPairs {
            inputs: &inputs,
            targets: &targets,
        };
        let run = |fused: bool| {
            // A context per run: the bf16 switch belongs to the context.
            let ctx = GpuContext::new(0).unwrap();
            ctx.set_matmul_bf16(true);
            let mut opts = BlockApOptions::recipe(QuantConfig::new(2, g).unwrap());
            opts.device = Device::Cuda(ctx);
            opts.fused_update = fused;
            train_block(&cfg, &w, &pairs, Some(&pairs), &opts, |_| {}).unwrap()
        };
        let (a, b) = (run(true), run(false));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let tag = format!("ffn {intermediate} g{g}");
        r.expect(&format!("{tag}: 8 steps"), a.step_losses.len() == 8);
        r.expect(
            &format!("{tag}: step losses"),
            bits(&a.step_losses) == bits(&b.step_losses),
        );
        r.expect(
            &format!("{tag}: val losses"),
            bits(&a.val_losses) == bits(&b.val_losses),
        );
        for i in 0..7 {
            let same = |x: &Tensor, y: &Tensor| bits(&x.to_f32_vec()) == bits(&y.to_f32_vec());
            r.expect(
                &format!("{tag}: weight {i}"),
                same(&a.weights.linears[i], &b.weights.linears[i]),
            );
            r.expect(
                &format!("{tag}: scales {i}"),
                same(&a.scales[i], &b.scales[i]),
            );
            r.expect(&format!("{tag}: zeros {i}"), same(&a.zeros[i], &b.zeros[i]));
        }
        let moved = a.step_losses.first() != a.step_losses.last();
        r.expect(&format!("{tag}: the loss moves"), moved);
        say(&format!("  {tag}: losses {:?}", a.step_losses));
    }
    r.finish();
}
