use super::*;

#[test]
fn lambda_anneals_linearly_from_one_to_zero_then_stays() {
    let t0 = 8;
    let got: Vec<f32> = (0..12).map(|t| lambda(t, t0)).collect();
    for (t, &l) in got.iter().enumerate() {
        let want = (1.0 - t as f64 / 8.0).max(0.0);
        assert!((l as f64 - want).abs() < 1e-7, "t {t}: {l} vs {want}");
    }
    assert_eq!(got[0], 1.0, "the first step sees only FP inputs");
    assert_eq!(got[4], 0.5);
    assert!(got[8..].iter().all(|&l| l == 0.0));
    assert!(got.windows(2).all(|w| w[1] <= w[0]), "monotone: {got:?}");
    assert_eq!(lambda(0, 0), 0.0, "T0 = 0: quantized inputs from the start");
}

#[test]
fn modules_are_contiguous_and_cover_every_block() {
    assert_eq!(module_ranges(5, 2).unwrap(), vec![0..3, 3..5]);
    assert_eq!(
        module_ranges(30, 4).unwrap(),
        vec![0..8, 8..16, 16..23, 23..30]
    );
    assert_eq!(module_ranges(3, 1).unwrap(), vec![0..3]);
    for k in [0, 6] {
        let e = module_ranges(5, k).unwrap_err().to_string();
        assert!(e.contains(&format!("--modules {k} with 5 blocks")), "{e}");
    }
}

fn msg(step: usize, start: usize, v: f32) -> QuantOutput {
    QuantOutput {
        step,
        start,
        output: Tensor::from_vec(&[1, 1, 2], vec![v, -v]).unwrap(),
    }
}

#[test]
fn queue_delivers_in_step_order_then_replays_the_last_outputs() {
    let (tx, rx) = mpsc::sync_channel(2);
    // Two batches (starts 0 and 2) per epoch, two epochs: the producer runs ahead in its own thread and blocks
    // when the queue holds 2 messages.
    let producer = std::thread::spawn(move || {
        for step in 0..4 {
            tx.send(msg(step, (step % 2) * 2, step as f32)).unwrap();
        }
    });
    let mut up = Upstream::new(rx);
    for step in 0..4 {
        let got = up.next(step, (step % 2) * 2).unwrap();
        assert_eq!(got.f32s("t").unwrap(), &[step as f32, -(step as f32)]);
    }
    producer.join().unwrap();
    // The producer finished: later steps get its last output of each batch.
    assert_eq!(up.next(4, 0).unwrap().f32s("t").unwrap()[0], 2.0);
    assert_eq!(up.next(5, 2).unwrap().f32s("t").unwrap()[0], 3.0);
    let e = up.next(6, 4).unwrap_err().to_string();
    assert!(e.contains("stopped before sending batch 4"), "{e}");
}

#[test]
fn queue_out_of_order_is_an_error() {
    let (tx, rx) = mpsc::sync_channel(4);
    tx.send(msg(1, 0, 1.0)).unwrap();
    let mut up = Upstream::new(rx);
    let e = up.next(0, 0).unwrap_err().to_string();
    assert!(
        e.contains("expected step 0 batch 0, got step 1 batch 0"),
        "{e}"
    );
}

#[test]
fn host_bytes_count_the_weights_and_the_later_modules_outputs() {
    let cfg = crate::bench::BenchShape::Llama2_7b.config();
    let cfg = LlamaConfig {
        n_layers: 32,
        ..cfg
    };
    // 32 blocks of 4 x 4096² + 3 x 4096 x 11008 = 202,375,168 linear weights and two 4096-wide norms, in f32.
    let weights = 32 * (202_375_168u64 + 2 * 4096) * 4;
    assert_eq!(host_bytes(&cfg, 4096, 2048, 1), weights);
    // Three later modules, each 4096 windows x 2048 tokens x 4096 values in f16.
    assert_eq!(
        host_bytes(&cfg, 4096, 2048, 4),
        weights + 3 * 4096 * 2048 * 4096 * 2
    );
}
