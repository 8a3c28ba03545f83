//! Tests of cross_entropy: cpu vs ref, ref vs finite differences, the tape wrapper, errors.
use super::*;
use crate::tensor::rng::Rng;
use crate::testing::*;

/// Forward, compared in f64 before the cast of the loss to f32: f32 exp (wide, ~2 ulp) summed 8 per lane over
/// 256-wide blocks, then in f64. Measured at most 1e-7 on these cases; a 1e-5 relative error in the exp sum fails.
const FWD_ATOL: f64 = 1e-6;
/// Backward: softmax from f32 (x - max) - log_sum, measured relative error up to 1.5e-6; entries near 0 need
/// the atol.
const BWD_ATOL: f64 = 1e-7;
const BWD_RTOL: f64 = 5e-6;

/// Logits N(offset, std²) and targets in [0, V), about a quarter replaced by ignore_index (row 0 always
/// counts, so the mean is defined).
fn draw(
    rng: &mut Rng,
    n: usize,
    v: usize,
    std: f64,
    offset: f32,
    ignore: i32,
) -> (Vec<f32>, Vec<i32>) {
    let logits = rng
        .normal_vec(n * v, std)
        .iter()
        .map(|x| x + offset)
        .collect();
    let targets = (0..n)
        .map(|r| {
            let t = rng.below(v) as i32;
            if r > 0 && rng.below(4) == 0 {
                ignore
            } else if t == ignore {
                (t + 1) % v as i32
            } else {
                t
            }
        })
        .collect();
    (logits, targets)
}

#[test]
fn cross_entropy_cpu_matches_ref_forward_and_backward() {
    let mut rng = Rng::new(61);
    // (N, V, std, offset, ignore_index): V = 1; V below, at and above one f32x8 and one 256 sum block;
    // large logits (offset 1000) for stability; an ignore_index inside [0, V).
    let cases = [
        (1, 1, 1.0, 0.0, -100),
        (1, 7, 1.0, 0.0, -100),
        (5, 13, 3.0, 0.0, -100),
        (8, 33, 3.0, 0.0, -100),
        (6, 257, 2.0, 0.0, -100),
        (3, 1000, 5.0, 0.0, -100),
        (7, 300, 3.0, 1000.0, -100),
        (9, 13, 1.0, -50.0, 0),
    ];
    for (n, v, std, offset, ignore) in cases {
        let (x, targets) = draw(&mut rng, n, v, std, offset, ignore);
        let x64 = to_f64(&x);
        let mut lse = vec![RowLse::default(); n];
        let (sum, count) = cross_entropy_fwd_cpu(&mut lse, &x, v, &targets, ignore);
        assert_eq!(count, targets.iter().filter(|&&t| t != ignore).count());
        let want = cross_entropy_fwd_ref(&x64, v, &targets, ignore);
        let name = format!("ce fwd N={n} V={v} offset={offset}");
        assert_close_f64(&name, &[sum / count as f64], &[want], FWD_ATOL, 0.0);

        let dout = 0.37;
        let mut d = vec![f32::NAN; n * v];
        cross_entropy_bwd_cpu(&mut d, &x, v, &targets, ignore, &lse, dout / count as f32);
        let mut d_ref = vec![0.0; n * v];
        cross_entropy_bwd_ref(&mut d_ref, &x64, v, &targets, ignore, dout as f64);
        let name = format!("ce bwd N={n} V={v} offset={offset}");
        assert_close(&name, &d, &d_ref, BWD_ATOL, BWD_RTOL);
    }
}

#[test]
fn cross_entropy_ref_backward_matches_finite_differences() {
    let mut rng = Rng::new(62);
    for (n, v) in [(1, 1), (3, 7), (4, 13)] {
        let (x, targets) = draw(&mut rng, n, v, 2.0, 0.0, -100);
        let x64 = to_f64(&x);
        let dout = -1.7;
        let mut d = vec![0.0; n * v];
        cross_entropy_bwd_ref(&mut d, &x64, v, &targets, -100, dout);
        let fd = finite_diff(&x64, 1e-5, |x| {
            dout * cross_entropy_fwd_ref(x, v, &targets, -100)
        });
        // Smooth: truncation ~h²·f''' ~ 1e-10, rounding ~1e-16·|f| / h ~ 1e-11.
        assert_close_f64("ce dlogits ref vs fd", &d, &fd, 1e-8, 1e-6);
    }
}

#[test]
fn cross_entropy_does_not_depend_on_the_thread_count() {
    let mut rng = Rng::new(63);
    let (n, v) = (37, 300);
    let (x, targets) = draw(&mut rng, n, v, 3.0, 0.0, -100);
    let run = |threads| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            cross_entropy_nll_sum(
                &Tensor::from_vec(&[n, v], x.clone()).unwrap(),
                &targets,
                -100,
            )
        })
        .unwrap()
    };
    let (a, b) = (run(1), run(3));
    assert_eq!((a.0.to_bits(), a.1), (b.0.to_bits(), b.1));
}

#[test]
fn cross_entropy_on_the_tape_matches_cpu_and_ref() {
    let mut rng = Rng::new(64);
    let (b, t, v) = (2, 3, 17);
    let (x, targets) = draw(&mut rng, b * t, v, 2.0, 0.0, -100);
    let count = targets.iter().filter(|&&t| t != -100).count();
    let mut tape = Tape::new();
    let vx = tape.leaf(Tensor::from_vec(&[b, t, v], x.clone()).unwrap(), true);
    let loss = cross_entropy(&mut tape, vx, &targets, -100).unwrap();
    let mut lse = vec![RowLse::default(); b * t];
    let (sum, _) = cross_entropy_fwd_cpu(&mut lse, &x, v, &targets, -100);
    assert_eq!(
        tape.value(loss).f32s("t").unwrap()[0],
        (sum / count as f64) as f32
    );
    // Scale the loss so that dout != 1 reaches the backward.
    let scaled = crate::ops::scale::scale(&mut tape, loss, 0.37).unwrap();
    tape.backward(scaled).unwrap();
    let mut d_ref = vec![0.0; x.len()];
    cross_entropy_bwd_ref(&mut d_ref, &to_f64(&x), v, &targets, -100, 0.37f32 as f64);
    let g = tape.grad(vx).unwrap();
    assert_eq!(g.shape(), &[b, t, v]);
    assert_close(
        "ce tape dlogits",
        g.f32s("t").unwrap(),
        &d_ref,
        BWD_ATOL,
        BWD_RTOL,
    );

    // Without a gradient to compute, the value is the same and nothing is recorded for backward.
    let mut tape = Tape::new();
    let vx = tape.input(Tensor::from_vec(&[b, t, v], x.clone()).unwrap());
    let loss = cross_entropy(&mut tape, vx, &targets, -100).unwrap();
    assert_eq!(
        tape.value(loss).f32s("t").unwrap()[0],
        (sum / count as f64) as f32
    );
    assert!(tape.backward(loss).is_err());
}

#[test]
fn cross_entropy_nll_sum_counts_only_targets_that_are_not_ignored() {
    let mut rng = Rng::new(65);
    let (n, v) = (11, 29);
    let (x, targets) = draw(&mut rng, n, v, 2.0, 0.0, -100);
    let logits = Tensor::from_vec(&[n, v], x.clone()).unwrap();
    let (sum, count) = cross_entropy_nll_sum(&logits, &targets, -100).unwrap();
    let want_count = targets.iter().filter(|&&t| t != -100).count();
    assert_eq!(count, want_count);
    let want = cross_entropy_fwd_ref(&to_f64(&x), v, &targets, -100) * want_count as f64;
    // A sum of 11 NLLs: their errors add up.
    assert_close_f64("ce nll sum", &[sum], &[want], 11.0 * FWD_ATOL, 0.0);
    let none = vec![-100; n];
    assert_eq!(
        cross_entropy_nll_sum(&logits, &none, -100).unwrap(),
        (0.0, 0)
    );
}

#[test]
fn cross_entropy_propagates_nan_logits() {
    // wide's exp maps NaN to 0; a NaN away from the target, in the f32x8 part of the row, must still
    // poison the row, as in torch.
    let mut x = vec![0.5f32; 2 * 19];
    x[19 + 5] = f32::NAN;
    let logits = Tensor::from_vec(&[2, 19], x).unwrap();
    let (sum, count) = cross_entropy_nll_sum(&logits, &[3, 2], -100).unwrap();
    assert!(sum.is_nan() && count == 2, "{sum} {count}");
    let mut tape = Tape::new();
    let vx = tape.leaf(logits, true);
    let loss = cross_entropy(&mut tape, vx, &[3, 2], -100).unwrap();
    tape.backward(loss).unwrap();
    let g = tape.grad(vx).unwrap().f32s("t").unwrap();
    assert!(g[..19].iter().all(|d| d.is_finite()) && g[19..].iter().all(|d| d.is_nan()));
}

#[test]
fn cross_entropy_rejects_bad_targets_and_shapes() {
    let mut tape = Tape::new();
    let x = tape.input(Tensor::zeros(&[3, 13]));
    let err = |tape: &mut Tape, t: &[i32]| cross_entropy(tape, x, t, -100).unwrap_err().to_string();
    let e = err(&mut tape, &[0, 13, 1]);
    assert!(
        e.contains("cross_entropy") && e.contains("target 13") && e.contains("row 1"),
        "{e}"
    );
    assert!(e.contains("[0, 13)") && e.contains("-100"), "{e}");
    let e = err(&mut tape, &[-1, 0, 1]);
    assert!(e.contains("target -1") && e.contains("row 0"), "{e}");
    let e = err(&mut tape, &[0, 1]);
    assert!(
        e.contains("cross_entropy") && e.contains("[3, 13]") && e.contains("2 entries"),
        "{e}"
    );
    let e = err(&mut tape, &[-100, -100, -100]);
    assert!(
        e.contains("cross_entropy") && e.contains("ignore_index -100"),
        "{e}"
    );
    let s = tape.input(Tensor::scalar(1.0));
    let e = cross_entropy(&mut tape, s, &[0], -100)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cross_entropy") && e.contains("[]"), "{e}");
    let e = cross_entropy_nll_sum(&Tensor::zeros(&[3, 13]), &[0, 1, 99], -100).unwrap_err();
    assert!(e.to_string().contains("cross_entropy_nll_sum") && e.to_string().contains("target 99"));
}
