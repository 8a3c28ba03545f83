//! Instruction data for E2E-QP (Alpaca style): each record's prompt and response are tokenized apart, joined,
//! and trained with the causal-LM loss on the response tokens only, as EfficientQAT's `datautils_e2e.py`
//! (`DataCollatorForCausalLM`, from qlora) does with `train_on_source=False`:
//!
//! ```text
//! ids    = [BOS] + tokens(prompt) + tokens(output) + [EOS]
//! labels = IGNORE for the prompt (BOS included), the response ids for the rest
//! ```
//!
//! The prompt is the Alpaca template, exactly as `ALPACA_PROMPT_DICT` in `datautils_e2e.py` writes it (with input
//! when the record's "input" is a non-empty string, else without):
//!
//! ```text
//! Below is an instruction that describes a task, paired with an input that provides further context. Write a
//! response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:␠
//!
//! Below is an instruction that describes a task. Write a response that appropriately completes the
//! request.\n\n### Instruction:\n{instruction}\n\n### Response:␠
//! ```
//!
//! (one line each; ␠ is the trailing space qlora's copy has after "### Response:", which Stanford Alpaca's
//! `train.py` does not). Where we differ: the sequence is cut at `--e2e-seqlen` tokens in all (upstream cuts the
//! prompt at 384 and the response at 128 tokens), and BOS is put in front only when the tokenizer adds one to
//! text (upstream writes `tokenizer.bos_token` always, which for a tokenizer without one is the text "None").
//! Records are not padded: E2E-QP runs one sequence at a time, each at its own length, so no padding position
//! exists to mask. Its loss is the mean over the sequence's response tokens, as HF's Trainer computes it at a
//! per-device batch of one.
use crate::error::{Error, Result};
use crate::io::tokenizer::Tokenizer;
use crate::tensor::rng::Rng;
use crate::train::e2e_qp::Example;

const PREAMBLE_WITH_INPUT: &str =
    "Below is an instruction that describes a task, paired with an input that \
     provides further context. Write a response that appropriately completes the request.\n\n";
const PREAMBLE_NO_INPUT: &str =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n";

/// One Alpaca record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instruction {
    pub instruction: String,
    /// Empty when the record has none.
    pub input: String,
    pub output: String,
}

impl Instruction {
    /// The Alpaca prompt of this record (the module comment shows both templates).
    pub fn prompt(&self) -> String {
        if self.input.is_empty() {
            format!(
                "{PREAMBLE_NO_INPUT}### Instruction:\n{}\n\n### Response: ",
                self.instruction
            )
        } else {
            format!(
                "{PREAMBLE_WITH_INPUT}### Instruction:\n{}\n\n### Input:\n{}\n\n### Response: ",
                self.instruction, self.input
            )
        }
    }

    /// The record's ids (BOS when the tokenizer adds one, the prompt, the output, EOS when the tokenizer has
    /// one) and how many of them are prompt.
    pub fn tokenize(&self, tokenizer: &Tokenizer) -> (Vec<u32>, usize) {
        let mut ids: Vec<u32> = tokenizer
            .bos_id()
            .filter(|_| tokenizer.add_bos())
            .into_iter()
            .collect();
        ids.extend(tokenizer.encode(&self.prompt()));
        let prompt_len = ids.len();
        ids.extend(tokenizer.encode(&self.output));
        ids.extend(tokenizer.eos_id());
        (ids, prompt_len)
    }
}

/// Training examples made from instruction records.
#[derive(Clone, Debug, Default)]
pub struct InstructionExamples {
    pub examples: Vec<Example>,
    /// Used records cut to the sequence length (their response lost its tail).
    pub truncated: usize,
    /// Records skipped because no response token fits in the sequence length.
    pub dropped: usize,
    /// Tokens that carry loss, over all examples.
    pub response_tokens: usize,
}

/// `count` examples from `records`, visited in a seeded random order (upstream shuffles with a fixed seed and
/// takes the first `max_train_samples`), each cut to `seqlen` tokens. A record whose prompt alone fills
/// `seqlen` is skipped (counted in `dropped`); too few usable records is an error.
pub fn instruction_examples(
    records: &[Instruction],
    tokenizer: &Tokenizer,
    seqlen: usize,
    count: usize,
    seed: u64,
) -> Result<InstructionExamples> {
    if seqlen < 2 {
        return Err(Error::invalid(
            "instruction data",
            format!("--e2e-seqlen {seqlen}: a prompt token and a response token need at least 2"),
        ));
    }
    let mut order: Vec<usize> = (0..records.len()).collect();
    let mut rng = Rng::new(seed);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let mut out = InstructionExamples::default();
    for &r in &order {
        if out.examples.len() == count {
            break;
        }
        let (mut ids, prompt_len) = records[r].tokenize(tokenizer);
        if ids.len() > seqlen {
            ids.truncate(seqlen);
            out.truncated += 1;
        }
        if ids.len() <= prompt_len {
            out.dropped += 1;
            continue;
        }
        out.response_tokens += ids.len() - prompt_len;
        out.examples.push(Example::response_only(ids, prompt_len));
    }
    if out.examples.len() < count {
        return Err(Error::invalid(
            "instruction data",
            format!(
                "{} of {} records keep a response token within --e2e-seqlen {seqlen} ({} dropped); \
                 --e2e-train-size asks for {count}",
                out.examples.len(),
                records.len(),
                out.dropped
            ),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_follow_the_alpaca_templates() {
        let mut r = Instruction {
            instruction: "Add the numbers.".into(),
            input: "2 and 3".into(),
            output: "5".into(),
        };
        assert_eq!(
            r.prompt(),
            "Below is an instruction that describes a task, paired with an input that provides further context. \
             Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n\
             ### Input:\n2 and 3\n\n### Response: "
        );
        r.input.clear();
        assert_eq!(
            r.prompt(),
            "Below is an instruction that describes a task. Write a response that appropriately completes the \
             request.\n\n### Instruction:\nAdd the numbers.\n\n### Response: "
        );
    }
}
