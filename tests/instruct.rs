//! Alpaca instruction data for E2E-QP: which positions carry loss (exactly), what truncation does, and that
//! masked positions add nothing to the loss or to the scale gradients.
mod common;
mod shared_data;

use common::rtn_model;
use eqat::quant::fake_quant::QuantConfig;
use eqat::train::e2e_data::{read_e2e_file, E2eRecords};
use eqat::train::e2e_qp::{example_loss_and_grads, Example, IGNORE};
use eqat::train::instruct::{instruction_examples, Instruction};
use eqat::{Rng, Tensor};
use shared_data::shared_data;
use std::path::Path;

const FIXTURE: &str = "tests/fixtures/instruct/alpaca.json";

fn fixture() -> Vec<Instruction> {
    match read_e2e_file(Path::new(FIXTURE)).unwrap() {
        E2eRecords::Instructions(r) => r,
        other => panic!("the fixture reads as {other:?}"),
    }
}

/// Positions whose label counts.
fn counted(ex: &Example) -> Vec<usize> {
    (0..ex.labels.len())
        .filter(|&t| ex.labels[t] != IGNORE)
        .collect()
}

#[test]
fn response_only_labels_mark_exactly_the_positions_that_predict_the_response() {
    // Prompt = ids 0..3, response = ids 3..6: positions 2, 3, 4 predict 13, 14, 15; 0 and 1 predict prompt
    // tokens, 5 predicts nothing.
    let ex = Example::response_only(vec![10, 11, 12, 13, 14, 15], 3);
    assert_eq!(ex.labels, vec![IGNORE, IGNORE, 13, 14, 15, IGNORE]);
    // No prompt: the plain causal labels.
    let ids = vec![4, 5, 6];
    assert_eq!(Example::response_only(ids.clone(), 0), Example::causal(ids));
    // A prompt that fills the sequence leaves no position counted.
    assert!(counted(&Example::response_only(vec![1, 2, 3], 3)).is_empty());
}

#[test]
fn fixture_records_tokenize_with_the_loss_on_the_response_only() {
    let Some(model) = shared_data("tinyllamas/stories260K/stories260K.gguf") else {
        return;
    };
    let (_, tok) = eqat::model::open_model(&model).unwrap();
    let records = fixture();
    assert_eq!(records.len(), 6);
    assert_eq!(records[3].input, "", "a record without \"input\" has none");
    let bos: Vec<u32> = tok.bos_id().filter(|_| tok.add_bos()).into_iter().collect();
    let eos = tok.eos_id().expect("stories260K has an EOS");
    let mut lens = Vec::new();
    for r in &records {
        let (ids, prompt_len) = r.tokenize(&tok);
        let prompt: Vec<u32> = bos.iter().copied().chain(tok.encode(&r.prompt())).collect();
        assert_eq!(&ids[..prompt_len], &prompt[..]);
        assert_eq!(*ids.last().unwrap(), eos);
        assert_eq!(
            tok.decode(&ids[prompt_len..ids.len() - 1]).unwrap().trim(),
            r.output
        );
        let ex = Example::response_only(ids.clone(), prompt_len);
        let want: Vec<usize> = (prompt_len - 1..ids.len() - 1).collect();
        assert_eq!(counted(&ex), want, "{:?}", r.instruction);
        for &t in &want {
            assert_eq!(ex.labels[t], ids[t + 1] as i32);
        }
        lens.push((prompt_len, ids.len()));
    }

    // Cut between the longest prompt and the longest record: longer records lose their tail, and a record
    // whose prompt fills the cut is skipped.
    let (longest_prompt, longest) = (
        lens.iter().map(|l| l.0).max().unwrap(),
        lens.iter().map(|l| l.1).max().unwrap(),
    );
    let short_prompts: Vec<&(usize, usize)> =
        lens.iter().filter(|l| l.0 < longest_prompt).collect();
    let seqlen = short_prompts.iter().map(|l| l.0).max().unwrap() + 4;
    assert!(seqlen <= longest_prompt && seqlen < longest, "{lens:?}");
    let usable = lens.iter().filter(|l| l.0 < seqlen).count();
    assert_eq!(usable, 5, "{lens:?}");
    let made = instruction_examples(&records, &tok, seqlen, usable, 3).unwrap();
    assert_eq!(made.examples.len(), usable);
    let (mut response_tokens, mut cut) = (0, 0);
    for ex in &made.examples {
        assert!(ex.ids.len() <= seqlen);
        let (prompt_len, full) = *lens
            .iter()
            .zip(&records)
            .find(|(_, r)| r.tokenize(&tok).0.starts_with(&ex.ids))
            .unwrap()
            .0;
        assert_eq!(ex.ids.len(), full.min(seqlen));
        assert_eq!(
            counted(ex),
            (prompt_len - 1..ex.ids.len() - 1).collect::<Vec<_>>()
        );
        response_tokens += ex.ids.len() - prompt_len;
        cut += usize::from(full > seqlen);
    }
    assert_eq!(made.response_tokens, response_tokens);
    assert!(cut > 0, "{lens:?}");
    // Records are visited until `usable` examples are made, so the one unusable record may go unvisited; when
    // visited, it was cut (its prompt is longer than the cut) and then skipped.
    assert!(made.dropped <= 1);
    assert_eq!(made.truncated, cut + made.dropped);
    // The order is seeded: the same seed picks the same records in the same order, another seed not.
    let again = instruction_examples(&records, &tok, seqlen, usable, 3).unwrap();
    assert_eq!(again.examples, made.examples);
    let other = instruction_examples(&records, &tok, seqlen, usable, 4).unwrap();
    assert_ne!(other.examples, made.examples);
    let e = instruction_examples(&records, &tok, seqlen, usable + 1, 3)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("{usable} of 6 records")) && e.contains("--e2e-train-size"),
        "{e}"
    );
    // The record whose prompt fills the cut is skipped, and named in the count.
    let e = instruction_examples(
        &[records[5].clone(), records[0].clone()],
        &tok,
        seqlen,
        2,
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("1 of 2 records") && e.contains("1 dropped"),
        "{e}"
    );
}

/// |got - want| <= 1e-6 + 1e-4 |want| for every scale gradient: f32 sums in another order.
fn assert_grads_close(what: &str, got: &[Tensor], want: &[Vec<f64>]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        for (j, (&a, &b)) in g.f32s("t").unwrap().iter().zip(w).enumerate() {
            assert!(
                (a as f64 - b).abs() <= 1e-6 + 1e-4 * b.abs(),
                "{what}: scale tensor {i} element {j}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn masked_positions_add_nothing_to_the_loss_or_the_scale_gradients() {
    let model = rtn_model(21, QuantConfig::new(4, 8).unwrap());
    let mut rng = Rng::new(4);
    let ids: Vec<u32> = (0..11).map(|_| rng.below(50) as u32).collect();
    let ex = Example::response_only(ids.clone(), 5);
    let (loss, grads) = example_loss_and_grads(&model, &ex).unwrap();
    let positions = counted(&ex);
    assert_eq!(positions, vec![4, 5, 6, 7, 8, 9]);

    // The loss and gradient are the means of those of each counted position alone: masked positions count
    // neither in the sum nor in the mean.
    let n = positions.len() as f64;
    let (mut loss_mean, mut grad_mean) = (0.0f64, vec![Vec::<f64>::new(); grads.len()]);
    for &p in &positions {
        let mut one = ex.clone();
        for (t, l) in one.labels.iter_mut().enumerate() {
            if t != p {
                *l = IGNORE;
            }
        }
        let (l, g) = example_loss_and_grads(&model, &one).unwrap();
        loss_mean += l as f64 / n;
        for (acc, g) in grad_mean.iter_mut().zip(&g) {
            let g = g.f32s("t").unwrap();
            acc.resize(g.len(), 0.0);
            for (a, &x) in acc.iter_mut().zip(g) {
                *a += x as f64 / n;
            }
        }
    }
    assert!(
        (loss as f64 - loss_mean).abs() <= 1e-5 * loss_mean,
        "{loss} vs {loss_mean}"
    );
    assert_grads_close("mean of single positions", &grads, &grad_mean);

    // Padding after the sequence with ignored labels changes nothing (causal attention, no label).
    let mut padded = ex.clone();
    padded.ids.extend([0, 0, 0]);
    padded.labels.extend([IGNORE; 3]);
    let (lp, gp) = example_loss_and_grads(&model, &padded).unwrap();
    assert!((lp - loss).abs() <= 1e-6 * loss, "{lp} vs {loss}");
    let want: Vec<Vec<f64>> = grads
        .iter()
        .map(|g| g.f32s("t").unwrap().iter().map(|&x| x as f64).collect())
        .collect();
    assert_grads_close("padded", &gp, &want);

    // The mask is not a no-op: counting the prompt too gives another loss.
    let (lc, _) = example_loss_and_grads(&model, &Example::causal(ids)).unwrap();
    assert!((lc - loss).abs() > 1e-3, "{lc} vs {loss}");
}
