//! The CUDA backend around the kernels: context errors, NVRTC cache, the caching allocator, host <-> device
//! copies, mixed-storage errors, AdamW on the device, and a small training graph whose GPU tape (ops dispatched
//! on device storage, gradients seeded, zeroed and accumulated on the device) tracks the CPU tape for a few
//! steps. Without a GPU each test prints `skipped: no CUDA device` and returns.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use eqat::gpu::{cached_ptx_count, GpuContext};
use eqat::ops::{add::add, linear::linear, mse::mse, rmsnorm::rmsnorm, rope, swiglu::swiglu};
use eqat::quant::fake_quant::{fake_quant, init_minmax, QuantConfig};
use eqat::testing::to_f64;
use eqat::train::adamw::{adamw_update_cuda, adamw_update_ref, AdamW, AdamWCoefs, ParamGroup};
use eqat::{Rng, Tape, Tensor, Var};
use std::sync::Arc;

#[test]
fn context_cache_copies_and_storage_errors() {
    let Some(ctx) = device("context") else { return };
    let mut r = Report::new("context/cache/copies");
    let e = GpuContext::new(1000).unwrap_err().to_string();
    r.expect(
        &format!("bad ordinal error: {e}"),
        e.starts_with("no CUDA device: ordinal 1000"),
    );
    r.expect(
        &format!("arch {}", ctx.arch()),
        ctx.arch().starts_with("sm_"),
    );

    let m1 = ctx.module(&eqat::ops::add::CUDA).unwrap();
    let before = cached_ptx_count();
    let m2 = ctx.module(&eqat::ops::add::CUDA).unwrap();
    r.expect(
        "module loaded once",
        Arc::ptr_eq(&m1, &m2) && cached_ptx_count() == before,
    );
    for src in eqat::gpu::kernel_sources() {
        r.expect(&format!("module {}", src.op), ctx.module(&src).is_ok());
    }

    let mut rng = Rng::new(201);
    let host = Tensor::randn(&[3, 7, 5], 1.0, &mut rng);
    let dev = host.to_device(&ctx).unwrap();
    r.expect(
        "device name",
        dev.device_name() == format!("cuda:{}", ctx.ordinal()) && dev.is_cuda(),
    );
    r.expect(
        "round trip bitwise",
        dev.to_host().unwrap().to_f32_vec() == host.to_f32_vec(),
    );
    r.expect(
        "clone on device",
        dev.clone().to_host().unwrap().to_f32_vec() == host.to_f32_vec(),
    );
    let half = host.to_dtype(eqat::DType::BF16);
    r.expect(
        "bf16 widened",
        half.to_device(&ctx).unwrap().to_f32_vec() == half.to_f32_vec(),
    );
    let e = dev.f32s("some_op").unwrap_err().to_string();
    r.expect(
        &format!("host accessor error: {e}"),
        e.contains("some_op") && e.contains("cuda:0"),
    );

    let mut tape = Tape::new();
    let a = tape.input(dev.clone());
    let b = tape.input(Tensor::zeros(&[5]));
    let e = add(&mut tape, a, b).unwrap_err().to_string();
    r.expect(
        &format!("mixed storage error: {e}"),
        e.contains("add") && e.contains("cuda:0") && e.contains("host"),
    );

    // Poisoning: a fresh buffer reads as NaN everywhere until written.
    r.expect(
        "poisoned alloc",
        ctx.alloc(1000)
            .unwrap()
            .to_vec()
            .unwrap()
            .iter()
            .all(|v| v.is_nan()),
    );
    r.finish();
}

#[test]
fn caching_allocator_reuses_and_reports_peak() {
    let Some(_) = device("allocator") else { return };
    let mut r = Report::new("caching allocator");
    // A context of its own, so that other tests' buffers do not move its counters.
    let ctx = GpuContext::new(0).unwrap();
    let a = ctx.alloc(1000).unwrap(); // 4000 bytes -> the 4096 class
    let b = ctx.alloc(3 << 20).unwrap(); // 12 MiB -> its own class
    let s = ctx.memory_stats();
    r.expect(
        &format!("two driver allocs {s:?}"),
        s.driver_allocs == 2 && s.reuses == 0,
    );
    r.expect(
        "in use",
        s.in_use == 4096 + (12 << 20) && s.peak_in_use == s.in_use,
    );
    drop(a);
    let c = ctx.alloc(900).unwrap(); // 3600 bytes: the same 4096 class
    let s = ctx.memory_stats();
    r.expect(
        &format!("reuse {s:?}"),
        s.driver_allocs == 2 && s.reuses == 1,
    );
    drop((b, c));
    let s = ctx.memory_stats();
    r.expect(
        &format!("all cached {s:?}"),
        s.in_use == 0 && s.reserved == 4096 + (12 << 20),
    );
    r.expect("peak kept", s.peak_in_use == 4096 + (12 << 20));
    r.expect(
        "empty_cache",
        ctx.empty_cache() == 4096 + (12 << 20) && ctx.memory_stats().reserved == 0,
    );
    r.finish();
}

#[test]
fn adamw_update_matches_ref() {
    let Some(ctx) = device("adamw") else { return };
    let mut r = Report::new("adamw update");
    let mut rng = Rng::new(202);
    for n in [1, 7, 1000, 100_003] {
        let p0 = rng.normal_vec(n, 1.0);
        let (mut p, mut m, mut v) = (up(&ctx, &p0), ctx.zeros(n).unwrap(), ctx.zeros(n).unwrap());
        let (mut p64, mut m64, mut v64) = (to_f64(&p0), vec![0.0; n], vec![0.0; n]);
        for t in 1..=3 {
            let g = rng.normal_vec(n, 0.1);
            let c = AdamWCoefs::new(1e-2, 0.01, 0.9, 0.999, 1e-8, t);
            adamw_update_cuda(&mut p, &up(&ctx, &g), &mut m, &mut v, &c).unwrap();
            adamw_update_ref(
                &mut p64,
                &to_f64(&g),
                &mut m64,
                &mut v64,
                1e-2,
                0.01,
                0.9,
                0.999,
                1e-8,
                t,
            );
        }
        r.check(&format!("p n={n}"), &down(&p), &p64);
        r.check(&format!("m n={n}"), &down(&m), &m64);
        r.check(&format!("v n={n}"), &down(&v), &v64);
    }
    r.finish();
}

/// Pinned host buffers round-trip exactly, and AdamW with pinned moments (whole-tape `step`, or one parameter
/// at a time with `step_param_cuda`) moves parameters and moments bit for bit as with device moments, also
/// after a save (`sync_state_to_host`) and a `load_state` into a fresh optimizer.
#[test]
fn adamw_pinned_moments_equal_device_moments() {
    let Some(ctx) = device("adamw pinned") else {
        return;
    };
    let mut r = Report::new("adamw pinned moments");
    let mut rng = Rng::new(204);
    let x = rng.normal_vec(1000, 1.0);
    let mut pin = ctx.alloc_pinned_f32(1200).unwrap();
    pin.store(&up(&ctx, &x)).unwrap();
    let mut back = ctx.alloc(1000).unwrap();
    pin.load(&mut back).unwrap();
    r.expect(
        "pinned round trip",
        down(&back) == x && pin.to_vec(1000).unwrap() == x,
    );
    pin.write(&x[..10]).unwrap();
    r.expect("pinned write", pin.to_vec(10).unwrap() == x[..10]);
    r.expect(
        "pinned store over capacity errs",
        pin.store(&ctx.zeros(1201).unwrap()).is_err(),
    );

    let sizes = [7usize, 1000, 100_003];
    let init: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.normal_vec(n, 1.0)).collect();
    // Three optimizers: device moments (`step`), pinned (`step`), pinned one parameter at a time.
    let mut tapes: Vec<Tape> = (0..3).map(|_| Tape::new()).collect();
    let mut opts = Vec::new();
    let mut vars = Vec::new();
    for (i, tape) in tapes.iter_mut().enumerate() {
        let v: Vec<Var> = init
            .iter()
            .map(|p| {
                tape.param(
                    Tensor::from_vec(&[p.len()], p.clone())
                        .unwrap()
                        .to_device(&ctx)
                        .unwrap(),
                )
                .unwrap()
            })
            .collect();
        let group = |lr, params| ParamGroup {
            params,
            lr,
            weight_decay: 0.01,
        };
        let mut o = AdamW::new(
            vec![group(1e-2, v[..1].to_vec()), group(3e-3, v[1..].to_vec())],
            0.9,
            0.999,
            1e-8,
        )
        .unwrap();
        o.set_pinned_moments(i > 0);
        opts.push(o);
        vars.push(v);
    }
    let grads = |rng: &mut Rng| -> Vec<Vec<f32>> {
        sizes.iter().map(|&n| rng.normal_vec(n, 0.1)).collect()
    };
    let run =
        |tapes: &mut [Tape], opts: &mut [AdamW], vars: &[Vec<Var>], g: &[Vec<f32>], lr: f32| {
            for (i, (tape, o)) in tapes.iter_mut().zip(opts.iter_mut()).enumerate() {
                for (v, g) in vars[i].iter().zip(g) {
                    tape.set_grad(
                        *v,
                        Tensor::from_vec(&[g.len()], g.clone())
                            .unwrap()
                            .to_device(&ctx)
                            .unwrap(),
                    )
                    .unwrap();
                }
                if i < 2 {
                    o.step(tape, lr).unwrap();
                    continue;
                }
                for &v in &vars[i] {
                    let g = tape.take_grad(v).unwrap();
                    o.step_param_cuda(
                        v,
                        tape.value_mut(v).gpu_mut("t").unwrap(),
                        g.gpu("t").unwrap(),
                        lr,
                    )
                    .unwrap();
                }
                o.end_step();
            }
        };
    for step in 0..3 {
        let g = grads(&mut rng);
        run(&mut tapes, &mut opts, &vars, &g, 1.0 - 0.2 * step as f32);
    }
    let values = |tape: &Tape, vars: &[Var]| -> Vec<Vec<f32>> {
        vars.iter().map(|&v| tape.value(v).to_f32_vec()).collect()
    };
    let want = values(&tapes[0], &vars[0]);
    for i in 1..3 {
        r.expect(
            &format!("optimizer {i}: params after 3 steps"),
            values(&tapes[i], &vars[i]) == want,
        );
    }
    for o in &mut opts {
        o.sync_state_to_host().unwrap();
    }
    r.expect(
        "pinned state == device state",
        opts[1].state() == opts[0].state() && opts[2].state() == opts[0].state(),
    );
    r.expect("steps counted", opts[2].steps() == 3);
    // Resume: a fresh pinned optimizer loaded with the saved state continues exactly like the device one.
    let saved = opts[0].state().clone();
    opts[1] = AdamW::new(opts[1].groups().to_vec(), 0.9, 0.999, 1e-8).unwrap();
    opts[1].set_pinned_moments(true);
    opts[1].load_state(saved).unwrap();
    let g = grads(&mut rng);
    run(&mut tapes, &mut opts, &vars, &g, 0.5);
    r.expect(
        "after resume",
        values(&tapes[1], &vars[1]) == values(&tapes[0], &vars[0]),
    );
    r.finish();
}

const C: usize = 8;
const F: usize = 16;
const SHAPE: [usize; 4] = [2, 5, 3, C];

/// loss = mse(x + linear(swiglu(linear(rope(h), fq(Wg)), linear(h, Wu)), Wd, bd), target), h = rmsnorm(x, w),
/// with params [w, Wg, scales, zeros, Wu, Wd, bd]. x is used twice (rmsnorm and the residual), so its gradient
/// accumulates on the tape. Returns (loss, x, target), x and target leaves that need gradients.
fn forward(tape: &mut Tape, p: &[Var], x: &Tensor, target: &Tensor) -> (Var, Var, Var) {
    let cfg = QuantConfig::new(4, 4).unwrap();
    let (x, target) = (tape.leaf(x.clone(), true), tape.leaf(target.clone(), true));
    let h = rmsnorm(tape, x, p[0], 1e-5).unwrap();
    let q = rope::rope(tape, h, 3, 1e4, rope::RopeLayout::HalfSplit).unwrap();
    let wg = fake_quant(tape, p[1], p[2], p[3], cfg).unwrap();
    let gate = linear(tape, q, wg, None).unwrap();
    let upv = linear(tape, h, p[4], None).unwrap();
    let s = swiglu(tape, gate, upv).unwrap();
    let o = linear(tape, s, p[5], Some(p[6])).unwrap();
    let res = add(tape, o, x).unwrap();
    (mse(tape, res, target).unwrap(), x, target)
}

fn host(tape: &Tape, v: Var, grad: bool) -> Vec<f32> {
    let t = if grad {
        tape.grad(v).unwrap()
    } else {
        tape.value(v)
    };
    t.to_host().unwrap().to_f32_vec()
}

#[test]
fn gpu_tape_tracks_cpu_tape_over_training_steps() {
    let Some(_) = device("tape") else { return };
    let mut r = Report::new("tape: 4 AdamW steps");
    // A context of its own, so that its allocator counters see only this test.
    let ctx = GpuContext::new(0).unwrap();
    ctx.set_poison(true);
    let mut rng = Rng::new(203);
    let wg = Tensor::randn(&[F, C], 0.3, &mut rng);
    let (s, z) = init_minmax(&wg, QuantConfig::new(4, 4).unwrap()).unwrap();
    let w = (0..C).map(|_| 1.0 + 0.1 * rng.normal() as f32).collect();
    let params = [
        Tensor::from_vec(&[C], w).unwrap(),
        wg,
        s,
        z,
        Tensor::randn(&[F, C], 0.3, &mut rng),
        Tensor::randn(&[C, F], 0.3, &mut rng),
        Tensor::randn(&[C], 0.1, &mut rng),
    ];
    let x = Tensor::randn(&SHAPE, 1.0, &mut rng);
    let target = Tensor::randn(&SHAPE, 1.0, &mut rng);
    let (xg, tg) = (x.to_device(&ctx).unwrap(), target.to_device(&ctx).unwrap());
    let (mut cpu, mut gpu) = (Tape::new(), Tape::new());
    let pc: Vec<Var> = params
        .iter()
        .map(|t| cpu.param(t.clone()).unwrap())
        .collect();
    let pg: Vec<Var> = params
        .iter()
        .map(|t| gpu.param(t.to_device(&ctx).unwrap()).unwrap())
        .collect();
    let groups = |p: &[Var]| {
        vec![
            ParamGroup {
                params: vec![p[2], p[3]],
                lr: 1e-3,
                weight_decay: 0.0,
            },
            ParamGroup {
                params: [0, 1, 4, 5, 6].map(|i| p[i]).to_vec(),
                lr: 1e-2,
                weight_decay: 0.01,
            },
        ]
    };
    let mut oc = AdamW::new(groups(&pc), 0.9, 0.999, 1e-8).unwrap();
    let mut og = AdamW::new(groups(&pg), 0.9, 0.999, 1e-8).unwrap();
    let mut allocs_after = Vec::new();
    for step in 0..4 {
        for tape in [&mut cpu, &mut gpu] {
            tape.reset();
            tape.zero_grad();
        }
        let (lc, xc, tc) = forward(&mut cpu, &pc, &x, &target);
        let (lg, xgv, tgv) = forward(&mut gpu, &pg, &xg, &tg);
        r.check(
            &format!("loss step {step}"),
            &host(&gpu, lg, false),
            &to_f64(&host(&cpu, lc, false)),
        );
        cpu.backward(lc).unwrap();
        gpu.backward(lg).unwrap();
        if step == 0 {
            let vars = pc
                .iter()
                .zip(&pg)
                .map(|(a, b)| (*a, *b))
                .chain([(xc, xgv), (tc, tgv)]);
            for (k, (vc, vg)) in vars.enumerate() {
                r.check(
                    &format!("grad {k} step 0"),
                    &host(&gpu, vg, true),
                    &to_f64(&host(&cpu, vc, true)),
                );
            }
        }
        oc.step(&mut cpu, 1.0).unwrap();
        og.step(&mut gpu, 1.0).unwrap();
        allocs_after.push(ctx.memory_stats().driver_allocs);
    }
    for (k, (vc, vg)) in pc.iter().zip(&pg).enumerate() {
        r.check(
            &format!("param {k} after 4 steps"),
            &host(&gpu, *vg, false),
            &to_f64(&host(&cpu, *vc, false)),
        );
    }
    og.sync_state_to_host().unwrap();
    for (k, (sc, sg)) in oc.state().params.iter().zip(&og.state().params).enumerate() {
        r.expect(&format!("state {k} steps"), sc.step == sg.step);
        r.check(&format!("state {k} m"), &sg.m, &to_f64(&sc.m));
        r.check(&format!("state {k} v"), &sg.v, &to_f64(&sc.v));
    }
    // Steady state: once the first steps have filled the cache, a step takes every buffer from it.
    r.expect(
        &format!("no driver allocs after step 2: {allocs_after:?}"),
        allocs_after[1] == allocs_after[3],
    );
    say(&format!("    tape test memory: {:?}", ctx.memory_stats()));

    // A non-finite gradient stops the step before any parameter moves.
    gpu.reset();
    gpu.zero_grad();
    let before = host(&gpu, pg[6], false);
    let nan_target = Tensor::full(&SHAPE, f32::NAN).to_device(&ctx).unwrap();
    let (loss, _, _) = forward(&mut gpu, &pg, &xg, &nan_target);
    gpu.backward(loss).unwrap();
    let e = og.step(&mut gpu, 1.0).unwrap_err().to_string();
    r.expect(
        &format!("non-finite error: {e}"),
        e.contains("non-finite") && e.contains("AdamW"),
    );
    r.expect("params untouched", host(&gpu, pg[6], false) == before);
    r.finish();
}
