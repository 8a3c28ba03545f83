use super::*;
use crate::ops::{mul::mul, sum::sum};
use crate::tensor::rng::Rng;
use crate::testing::*;

/// Sets every listed parameter's gradient to the given values: one backward of sum(p·r) per parameter
/// (dL/dp = r exactly; parameter gradients accumulate across backward calls).
fn set_grads(tape: &mut Tape, grads: &[(Var, Vec<f32>)]) {
    tape.reset();
    tape.zero_grad();
    for (p, r) in grads {
        let shape = tape.value(*p).shape().to_vec();
        let r = tape.input(Tensor::from_vec(&shape, r.clone()).unwrap());
        let prod = mul(tape, *p, r).unwrap();
        let loss = sum(tape, prod).unwrap();
        tape.backward(loss).unwrap();
    }
}

/// Each step moves p by about lr; f32 rounding of p (6e-8 relative) and of m/denom (~1e-6 relative of a
/// step of 1e-2) stay under 1e-6 absolute over a few steps.
const ATOL: f64 = 1e-6;
const RTOL: f64 = 1e-6;

#[test]
fn adamw_matches_f64_reference_over_several_steps_and_skips_params_without_grad() {
    let mut rng = Rng::new(17);
    let sizes = [1usize, 7, 1000, 5];
    let mut tape = Tape::new();
    let init: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.normal_vec(n, 1.0)).collect();
    let vars: Vec<Var> = init
        .iter()
        .map(|v| {
            tape.param(Tensor::from_vec(&[v.len()], v.clone()).unwrap())
                .unwrap()
        })
        .collect();
    let groups = vec![
        ParamGroup {
            params: vec![vars[0], vars[1]],
            lr: 1e-2,
            weight_decay: 0.0,
        },
        ParamGroup {
            params: vec![vars[2], vars[3]],
            lr: 3e-3,
            weight_decay: 0.1,
        },
    ];
    let (lrs, wds) = ([1e-2, 1e-2, 3e-3, 3e-3], [0.0, 0.0, 0.1, 0.1]);
    let mut opt = AdamW::new(groups, 0.9, 0.999, 1e-8).unwrap();
    let mut p64: Vec<Vec<f64>> = init.iter().map(|v| to_f64(v)).collect();
    let mut m64: Vec<Vec<f64>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    let mut v64 = m64.clone();
    for step in 1..=6u64 {
        let factor = 1.0 - 0.1 * step as f32;
        // vars[3] never gets a gradient: it must be skipped and keep step 0.
        let grads: Vec<(Var, Vec<f32>)> = (0..3)
            .map(|i| (vars[i], rng.normal_vec(sizes[i], 1.0)))
            .collect();
        set_grads(&mut tape, &grads);
        opt.step(&mut tape, factor).unwrap();
        for (i, (_, g)) in grads.iter().enumerate() {
            let lr = lrs[i] as f32 as f64 * factor as f64;
            let (p, m, v) = (&mut p64[i], &mut m64[i], &mut v64[i]);
            adamw_update_ref(
                p,
                &to_f64(g),
                m,
                v,
                lr,
                wds[i] as f32 as f64,
                0.9,
                0.999,
                1e-8,
                step,
            );
            let got = tape.value(vars[i]).f32s("t").unwrap();
            assert_close(&format!("step {step} param {i}"), got, &p64[i], ATOL, RTOL);
        }
    }
    assert_eq!(tape.value(vars[3]).f32s("t").unwrap(), &init[3][..]);
    let st = opt.state();
    assert_eq!(st.steps, 6);
    assert_eq!(
        st.params.iter().map(|p| p.step).collect::<Vec<_>>(),
        [6, 6, 6, 0]
    );
    assert!(st.params[3].m.is_empty());
}

#[test]
fn adamw_weight_decay_is_decoupled_not_l2() {
    let mut rng = Rng::new(4);
    let p0 = rng.normal_vec(64, 1.0);
    let grads: Vec<Vec<f32>> = (0..3).map(|_| rng.normal_vec(64, 1.0)).collect();
    let (lr, wd) = (1e-2f32, 0.5f32);
    let run = |wd: f32| {
        let mut tape = Tape::new();
        let v = tape
            .param(Tensor::from_vec(&[64], p0.clone()).unwrap())
            .unwrap();
        let group = ParamGroup {
            params: vec![v],
            lr,
            weight_decay: wd,
        };
        let mut opt = AdamW::new(vec![group], 0.9, 0.999, 1e-8).unwrap();
        for g in &grads {
            set_grads(&mut tape, &[(v, g.clone())]);
            opt.step(&mut tape, 1.0).unwrap();
        }
        to_f64(tape.value(v).f32s("t").unwrap())
    };
    let (with_wd, without) = (run(wd), run(0.0));
    // Decoupled: m and v never see the decay, so the Adam steps are the same with and without it and
    // p_wd - p_0 follows d ← d·(1 − lr·wd) − lr·wd·p_0 per step, d starting at 0.
    let mut want = vec![0.0; 64];
    let mut p_plain = to_f64(&p0);
    let mut d = vec![0.0f64; 64];
    let (mut m, mut v) = (vec![0.0; 64], vec![0.0; 64]);
    for (t, g) in grads.iter().enumerate() {
        let before = p_plain.clone();
        adamw_update_ref(
            &mut p_plain,
            &to_f64(g),
            &mut m,
            &mut v,
            lr as f64,
            0.0,
            0.9,
            0.999,
            1e-8,
            t as u64 + 1,
        );
        for i in 0..64 {
            d[i] = d[i] * (1.0 - (lr * wd) as f64) - (lr * wd) as f64 * before[i];
        }
    }
    for i in 0..64 {
        want[i] = without[i] + d[i];
    }
    assert_close("decoupled decay", &to_f32(&with_wd), &want, 1e-6, 1e-6);
    // Adam with L2 (decay folded into the gradient, so into m and v) ends elsewhere.
    let mut p_l2 = to_f64(&p0);
    let (mut m, mut v) = (vec![0.0; 64], vec![0.0; 64]);
    for (t, g) in grads.iter().enumerate() {
        let g_l2: Vec<f64> = g
            .iter()
            .zip(&p_l2)
            .map(|(&g, &p)| g as f64 + wd as f64 * p)
            .collect();
        adamw_update_ref(
            &mut p_l2,
            &g_l2,
            &mut m,
            &mut v,
            lr as f64,
            0.0,
            0.9,
            0.999,
            1e-8,
            t as u64 + 1,
        );
    }
    let max_gap = p_l2
        .iter()
        .zip(&with_wd)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        max_gap > 1e-3,
        "L2-coupled and decoupled decay agree to {max_gap}"
    );
}

#[test]
fn adamw_refuses_non_finite_gradients_without_touching_anything() {
    let mut tape = Tape::new();
    let a = tape
        .param(Tensor::from_vec(&[3], vec![1.0, 2.0, 3.0]).unwrap())
        .unwrap();
    let b = tape
        .param(Tensor::from_vec(&[2], vec![4.0, 5.0]).unwrap())
        .unwrap();
    let groups = vec![ParamGroup {
        params: vec![a, b],
        lr: 0.1,
        weight_decay: 0.1,
    }];
    let mut opt = AdamW::new(groups, 0.9, 0.999, 1e-8).unwrap();
    set_grads(
        &mut tape,
        &[(a, vec![0.1, 0.2, 0.3]), (b, vec![f32::INFINITY, 0.0])],
    );
    let err = opt.step(&mut tape, 1.0).unwrap_err().to_string();
    assert!(
        err.contains("non-finite") && err.contains("entry 1"),
        "{err}"
    );
    assert_eq!(tape.value(a).f32s("t").unwrap(), &[1.0, 2.0, 3.0]);
    assert_eq!(
        opt.state(),
        &AdamWState {
            steps: 0,
            params: vec![ParamState::default(); 2]
        }
    );
    assert!(opt.step(&mut tape, f32::NAN).is_err());
}

#[test]
fn adamw_resumes_bit_identically_from_saved_state() {
    let mut rng = Rng::new(9);
    let p0 = rng.normal_vec(37, 1.0);
    let grads: Vec<Vec<f32>> = (0..4).map(|_| rng.normal_vec(37, 1.0)).collect();
    let make = |p: Vec<f32>| {
        let mut tape = Tape::new();
        let v = tape.param(Tensor::from_vec(&[37], p).unwrap()).unwrap();
        let group = ParamGroup {
            params: vec![v],
            lr: 1e-2,
            weight_decay: 0.01,
        };
        (tape, v, AdamW::new(vec![group], 0.9, 0.95, 1e-6).unwrap())
    };
    let (mut tape, v, mut opt) = make(p0);
    for g in &grads[..2] {
        set_grads(&mut tape, &[(v, g.clone())]);
        opt.step(&mut tape, 1.0).unwrap();
    }
    let (saved_p, saved_state) = (
        tape.value(v).f32s("t").unwrap().to_vec(),
        opt.state().clone(),
    );
    let (mut tape2, v2, mut opt2) = make(saved_p);
    opt2.load_state(saved_state.clone()).unwrap();
    assert_eq!(opt2.steps(), 2);
    for g in &grads[2..] {
        set_grads(&mut tape, &[(v, g.clone())]);
        opt.step(&mut tape, 0.5).unwrap();
        set_grads(&mut tape2, &[(v2, g.clone())]);
        opt2.step(&mut tape2, 0.5).unwrap();
    }
    assert_eq!(
        tape.value(v).f32s("t").unwrap(),
        tape2.value(v2).f32s("t").unwrap()
    );
    assert_eq!(opt.state(), opt2.state());

    let mut short = saved_state.clone();
    short.params[0].m.pop();
    assert!(opt2.load_state(short).is_err());
    assert!(opt2.load_state(AdamWState::default()).is_err());
    // A state sized for another parameter is caught at the next step.
    let mut other = saved_state;
    other.params[0].m = vec![0.0; 5];
    other.params[0].v = vec![0.0; 5];
    opt2.load_state(other).unwrap();
    let err = opt2.step(&mut tape2, 1.0).unwrap_err().to_string();
    assert!(err.contains("5 values") && err.contains("[37]"), "{err}");
}

#[test]
fn adamw_rejects_bad_hyperparameters_and_foreign_vars() {
    let mut tape = Tape::new();
    let a = tape.param(Tensor::zeros(&[2])).unwrap();
    let group = |params: Vec<Var>, lr: f32| ParamGroup {
        params,
        lr,
        weight_decay: 0.0,
    };
    assert!(AdamW::new(vec![group(vec![a], 1e-3)], 1.0, 0.999, 1e-8).is_err());
    assert!(AdamW::new(vec![group(vec![a], 1e-3)], 0.9, 0.999, 0.0).is_err());
    assert!(AdamW::new(vec![group(vec![a], -1e-3)], 0.9, 0.999, 1e-8).is_err());
    let err = AdamW::new(
        vec![group(vec![a], 1e-3), group(vec![a], 1e-3)],
        0.9,
        0.999,
        1e-8,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("listed twice"), "{err}");
    let x = tape.input(Tensor::zeros(&[2]));
    let mut opt = AdamW::new(vec![group(vec![x], 1e-3)], 0.9, 0.999, 1e-8).unwrap();
    let err = opt.step(&mut tape, 1.0).unwrap_err().to_string();
    assert!(err.contains("not one of the tape's 1 parameters"), "{err}");
}
