//! E2E-QP's training examples for a train job.
use super::TrainArgs;
use crate::error::Result;
use crate::io::tokenizer::Tokenizer;
use crate::model::LlamaModel;
use crate::train::calib::calibration_windows;
use crate::train::e2e_data::{file_examples, E2eData};
use crate::train::e2e_qp::Example;

/// E2E-QP's training examples: Block-AP's windows when `--e2e-data calib` asks for the same shape, new windows
/// of the calibration source when not, or the `--e2e-data` file.
pub(super) fn e2e_examples(
    args: &TrainArgs,
    tokenizer: &Tokenizer,
    fp: &LlamaModel,
    calib_ids: Option<&[u32]>,
    block_ap_train: &[Vec<u32>],
    say: &mut impl FnMut(&str),
) -> Result<Vec<Example>> {
    let (seqlen, count) = (args.e2e_seqlen, args.e2e_train_size);
    let windows = match (&args.e2e_data, calib_ids) {
        (E2eData::File(path), _) => {
            return file_examples(path, tokenizer, seqlen, count, args.seed, say)
        }
        (E2eData::Calibration, _) if seqlen == args.seqlen && count == args.train_size => {
            block_ap_train.to_vec()
        }
        (E2eData::Calibration, Some(ids)) => {
            say(&format!(
                "E2E-QP data: {count} windows of {seqlen} tokens from the calibration text"
            ));
            calibration_windows(ids, seqlen, count, 0, args.seed)?.0
        }
        (E2eData::Calibration, None) => {
            say(&format!(
                "E2E-QP data: sampling {count} sequences of {seqlen} tokens from the model itself"
            ));
            let start = crate::model::generate::StartTokens::for_tokenizer(tokenizer);
            crate::model::generate::sample_sequences(fp, count, seqlen, 1.0, args.seed, start)?
        }
    };
    Ok(windows.into_iter().map(Example::causal).collect())
}
