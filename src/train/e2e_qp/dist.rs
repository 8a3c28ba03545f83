//! What data-parallel E2E-QP moves between ranks: the summed scale gradients and loss of every step, rank 0's
//! starting scales, rank 0's training sequences (ranks started by a launcher build none of their own) and, when
//! a run resumes, rank 0's saved progress.
use super::{E2eProgress, Example};
use crate::autograd::Tape;
use crate::dist::Communicator;
use crate::error::{Error, Result};
use crate::model::quantized::QuantizedModel;
use crate::tensor::Tensor;
use crate::train::adamw::{AdamWState, ParamState};

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

/// The shapes of `model`'s scales, [block][linear] order (as `E2eProgress::scales`).
pub fn scale_shapes(model: &QuantizedModel) -> Vec<Vec<usize>> {
    model
        .blocks
        .iter()
        .flat_map(|b| &b.linears)
        .map(|l| l.scales().shape().to_vec())
        .collect()
}

/// Rank 0's `progress` (a resumed run's saved state; None on a fresh start) on every rank, so that the ranks
/// continue from the same scales and AdamW state; the other ranks pass None. `shapes` are the scales' shapes
/// ([`scale_shapes`]). Counts travel as the bits of f32 words, as in [`share_examples`].
pub fn share_progress(
    comm: &dyn Communicator,
    progress: Option<E2eProgress>,
    shapes: &[Vec<usize>],
) -> Result<Option<E2eProgress>> {
    let word = |x: usize| f32::from_bits(x as u32);
    let root = comm.rank() == 0;
    if !root && progress.is_some() {
        return Err(Error::invalid(
            "e2e_qp",
            format!("rank {} shares progress: only rank 0 has it", comm.rank()),
        ));
    }
    // [saved?, steps done, AdamW steps, then per parameter: its step count and moment length]
    let mut head = vec![word(0); 3 + 2 * shapes.len()];
    if let Some(p) = &progress {
        if p.scales.len() != shapes.len() || p.adamw.params.len() != shapes.len() {
            return Err(Error::invalid(
                "e2e_qp",
                format!(
                    "progress of {} scales and {} AdamW parameters for a model of {} linears",
                    p.scales.len(),
                    p.adamw.params.len(),
                    shapes.len()
                ),
            ));
        }
        head[..3].copy_from_slice(&[word(1), word(p.losses.len()), word(p.adamw.steps as usize)]);
        for (i, st) in p.adamw.params.iter().enumerate() {
            head[3 + 2 * i] = word(st.step as usize);
            head[4 + 2 * i] = word(st.m.len());
        }
    }
    comm.broadcast(&mut head, 0)?;
    let count = |i: usize| head[i].to_bits() as usize;
    if count(0) == 0 {
        return Ok(None);
    }
    let moments: usize = (0..shapes.len()).map(|i| 2 * count(4 + 2 * i)).sum();
    let scale_words: usize = shapes.iter().map(|s| crate::tensor::numel(s)).sum();
    let mut body = Vec::with_capacity(count(1) + scale_words + moments);
    if let Some(p) = &progress {
        body.extend_from_slice(&p.losses);
        for t in &p.scales {
            body.extend_from_slice(t.f32s("e2e_qp share_progress")?);
        }
        for st in &p.adamw.params {
            body.extend_from_slice(&st.m);
            body.extend_from_slice(&st.v);
        }
    }
    body.resize(count(1) + scale_words + moments, 0.0);
    comm.broadcast(&mut body, 0)?;
    let mut rest = &body[..];
    let mut take = |n: usize| {
        let (a, b) = rest.split_at(n);
        rest = b;
        a.to_vec()
    };
    let losses = take(count(1));
    let scales = shapes
        .iter()
        .map(|s| Tensor::from_vec(s, take(crate::tensor::numel(s))))
        .collect::<Result<Vec<_>>>()?;
    let params = (0..shapes.len())
        .map(|i| ParamState {
            step: count(3 + 2 * i) as u64,
            m: take(count(4 + 2 * i)),
            v: take(count(4 + 2 * i)),
        })
        .collect();
    Ok(Some(E2eProgress {
        losses,
        scales,
        adamw: AdamWState {
            steps: count(2) as u64,
            params,
        },
    }))
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

    #[test]
    fn progress_reaches_every_rank_bit_for_bit_and_a_fresh_start_stays_none() {
        let shapes = vec![vec![2, 3], vec![4, 1]];
        let state = |step: u64, n: usize, at: f32| ParamState {
            step,
            m: (0..n).map(|i| at + i as f32).collect(),
            v: (0..n).map(|i| at * 0.5 - i as f32).collect(),
        };
        let progress = E2eProgress {
            losses: vec![2.5, f32::NAN, 1.25],
            scales: vec![
                Tensor::from_vec(&[2, 3], vec![0.1, 0.2, 0.3, 0.4, 0.5, -0.6]).unwrap(),
                Tensor::from_vec(&[4, 1], vec![1.0, 2.0, 3.0, 4.0]).unwrap(),
            ],
            adamw: AdamWState {
                steps: 3,
                params: vec![state(3, 6, 7.0), state(2, 4, -1.0)],
            },
        };
        for saved in [Some(progress.clone()), None] {
            let comms = loopback::group(3, Duration::from_secs(30)).unwrap();
            let got: Vec<Option<E2eProgress>> = std::thread::scope(|s| {
                let hs: Vec<_> = comms
                    .into_iter()
                    .map(|c| {
                        let mine = if c.rank() == 0 { saved.clone() } else { None };
                        let shapes = &shapes;
                        s.spawn(move || share_progress(&c, mine, shapes).unwrap())
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for g in got {
                match (&g, &saved) {
                    (None, None) => {}
                    (Some(g), Some(want)) => {
                        // NaN != NaN: compare the losses' bits, the rest with PartialEq.
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&g.losses), bits(&want.losses));
                        assert_eq!(g.adamw, want.adamw);
                        assert_eq!(g.scales.len(), 2);
                        for (a, b) in g.scales.iter().zip(&want.scales) {
                            assert_eq!(a.shape(), b.shape());
                            assert_eq!(a.f32s("t").unwrap(), b.f32s("t").unwrap());
                        }
                    }
                    _ => panic!("rank got {g:?} for {saved:?}"),
                }
            }
        }
    }
}
