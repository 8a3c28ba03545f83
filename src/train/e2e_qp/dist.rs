//! What data-parallel E2E-QP moves between ranks: the summed scale gradients and loss of every step, rank 0's
//! starting scales, and rank 0's training sequences (ranks started by a launcher build none of their own).
use super::Example;
use crate::autograd::Tape;
use crate::dist::Communicator;
use crate::error::{Error, Result};
use crate::model::quantized::QuantizedModel;
use crate::tensor::Tensor;

/// Sums every parameter gradient and `loss_sum` over the ranks; returns the summed loss. Host gradients and the
/// loss travel in one flat buffer (one collective); GPU gradients are summed where they are, one collective
/// each (`Communicator::all_reduce_sum_gpu`: on the device with NCCL).
pub(super) fn all_reduce_grads(
    tape: &mut Tape,
    comm: &dyn Communicator,
    loss_sum: f32,
) -> Result<f32> {
    let mut flat = Vec::new();
    for g in tape.param_grads_mut() {
        #[cfg(feature = "cuda")]
        if g.is_cuda() {
            comm.all_reduce_sum_gpu(g.gpu_mut("e2e_qp all-reduce")?)?;
            continue;
        }
        flat.extend_from_slice(g.f32s("e2e_qp all-reduce")?);
    }
    flat.push(loss_sum);
    comm.all_reduce_sum(&mut flat)?;
    let mut at = 0;
    for g in tape.param_grads_mut() {
        if g.is_cuda() {
            continue;
        }
        let d = g.f32s_mut("e2e_qp all-reduce")?;
        d.copy_from_slice(&flat[at..at + d.len()]);
        at += d.len();
    }
    Ok(flat[at])
}

/// Gives every rank rank 0's scales, so that all ranks start from the same model even when theirs came from
/// elsewhere (a checkpoint read by a launched rank). The scales are host tensors here (before training).
pub(super) fn broadcast_scales(model: &mut QuantizedModel, comm: &dyn Communicator) -> Result<()> {
    let mut flat = Vec::new();
    for l in model.blocks.iter().flat_map(|b| &b.linears) {
        flat.extend_from_slice(l.scales().f32s("e2e_qp scale broadcast")?);
    }
    comm.broadcast(&mut flat, 0)?;
    let mut at = 0;
    for l in model.blocks.iter_mut().flat_map(|b| b.linears.iter_mut()) {
        let shape = l.scales().shape().to_vec();
        let n = crate::tensor::numel(&shape);
        l.set_scales(Tensor::from_vec(&shape, flat[at..at + n].to_vec())?)?;
        at += n;
    }
    Ok(())
}

/// Rank 0's training sequences on every rank: rank 0 passes `Some(data)`, the others `None`. The ids and
/// labels travel as the bit patterns of f32 words (a broadcast copies words, it adds nothing), after a header
/// with the count and every sequence's length.
pub fn share_examples(comm: &dyn Communicator, data: Option<&[Example]>) -> Result<Vec<Example>> {
    let word = |x: u32| f32::from_bits(x);
    let root = comm.rank() == 0;
    if root != data.is_some() {
        return Err(Error::invalid(
            "e2e_qp",
            format!("rank {} shares examples: only rank 0 has them", comm.rank()),
        ));
    }
    let data = data.unwrap_or_default();
    let mut count = [word(data.len() as u32)];
    comm.broadcast(&mut count, 0)?;
    let n = count[0].to_bits() as usize;
    let mut lens: Vec<f32> = data.iter().map(|e| word(e.ids.len() as u32)).collect();
    lens.resize(n, 0.0);
    comm.broadcast(&mut lens, 0)?;
    let lens: Vec<usize> = lens.iter().map(|l| l.to_bits() as usize).collect();
    let total: usize = lens.iter().sum();
    let mut words: Vec<f32> = data
        .iter()
        .flat_map(|e| {
            let ids = e.ids.iter().map(|&i| word(i));
            ids.chain(e.labels.iter().map(|&l| word(l as u32)))
        })
        .collect();
    words.resize(2 * total, 0.0);
    comm.broadcast(&mut words, 0)?;
    let mut at = 0;
    Ok(lens
        .iter()
        .map(|&len| {
            let ids = words[at..at + len].iter().map(|w| w.to_bits()).collect();
            let labels = words[at + len..at + 2 * len]
                .iter()
                .map(|w| w.to_bits() as i32)
                .collect();
            at += 2 * len;
            Example { ids, labels }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::loopback;
    use std::time::Duration;

    #[test]
    fn examples_reach_every_rank_bit_for_bit() {
        let data = vec![
            Example::causal(vec![1, 2, 3]),
            Example::response_only(vec![7, u32::MAX, 0, 5, 9], 2),
            Example::causal(vec![42]),
        ];
        let comms = loopback::group(3, Duration::from_secs(30)).unwrap();
        let got: Vec<Vec<Example>> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    let mine = (c.rank() == 0).then_some(&data[..]);
                    s.spawn(move || share_examples(&c, mine).unwrap())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for g in got {
            assert_eq!(g, data);
        }
    }

    #[test]
    fn only_rank_zero_may_bring_examples() {
        let comms = loopback::group(2, Duration::from_secs(1)).unwrap();
        let e = share_examples(&comms[1], Some(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 1") && e.contains("only rank 0"), "{e}");
        let e = share_examples(&comms[0], None).unwrap_err().to_string();
        assert!(e.contains("rank 0"), "{e}");
    }
}
