//! embedding: out[p] = weight[ids[p]] for every position p; weight [V, C], ids shaped `shape`, out [shape.., C].
//!
//! Backward scatter-adds dout rows into dweight: dweight[v] += sum of dout[p] over the positions p with
//! ids[p] == v, in increasing p. The CPU version groups positions by id first (a counting sort), then adds
//! into the rows of dweight in parallel, each from its own positions in order: no atomics, and the same bits
//! for any thread count. Unlike the other ops' `=`, the backward kernels ADD into dweight (llm.c's rule for
//! parameter grads): rows of ids absent from the batch are never touched, which for V = 49152 saves a pass
//! over V * C values; the tape's buffer arrives zeroed, so the tape still gets the plain gradient.
//!
//! On the GPU (`cuda/embedding.cu`) the forward is a gather. The backward is deterministic without atomics:
//! the host groups the positions by id with the same counting sort (the ids are host data the op keeps), and one
//! block per distinct id adds its dout rows in increasing position order, so dweight equals the CPU's bit for bit.
use crate::autograd::{Backward, Tape, Var};
use crate::error::{Error, Result};
#[cfg(feature = "cuda")]
use crate::gpu::{Arg, GpuBuf, KernelSource};
use crate::ops::simd;
use crate::tensor::Tensor;
use rayon::prelude::*;

/// `ids` must all be below V (`embedding` checks them).
pub fn embedding_fwd_ref(out: &mut [f64], weight: &[f64], ids: &[u32], c: usize) {
    for (o, &id) in out.chunks_exact_mut(c).zip(ids) {
        o.copy_from_slice(&weight[id as usize * c..][..c]);
    }
}

/// Adds into `dweight`.
pub fn embedding_bwd_ref(dweight: &mut [f64], dout: &[f64], ids: &[u32], c: usize) {
    for (g, &id) in dout.chunks_exact(c).zip(ids) {
        for (d, g) in dweight[id as usize * c..][..c].iter_mut().zip(g) {
            *d += g;
        }
    }
}

pub fn embedding_fwd_cpu(out: &mut [f32], weight: &[f32], ids: &[u32], c: usize) {
    out.par_chunks_mut(c)
        .zip(ids.par_iter())
        .for_each(|(o, &id)| {
            o.copy_from_slice(&weight[id as usize * c..][..c]);
        });
}

/// Positions grouped by id (a counting sort, ids below `v`): `start[id]..start[id + 1]` indexes `positions`,
/// which lists each id's positions in increasing order.
fn group_positions(ids: &[u32], v: usize) -> (Vec<usize>, Vec<usize>) {
    let mut start = vec![0usize; v + 1];
    for &id in ids {
        start[id as usize + 1] += 1;
    }
    for i in 0..v {
        start[i + 1] += start[i];
    }
    let mut next = start[..v].to_vec();
    let mut positions = vec![0usize; ids.len()];
    for (p, &id) in ids.iter().enumerate() {
        positions[next[id as usize]] = p;
        next[id as usize] += 1;
    }
    (start, positions)
}

/// Adds into `dweight`; rows of ids that do not occur are left as they are.
pub fn embedding_bwd_cpu(dweight: &mut [f32], dout: &[f32], ids: &[u32], c: usize) {
    let (start, positions) = group_positions(ids, dweight.len() / c);
    dweight.par_chunks_mut(c).enumerate().for_each(|(id, row)| {
        for &p in &positions[start[id]..start[id + 1]] {
            simd::add_assign(row, &dout[p * c..][..c]);
        }
    });
}

#[cfg(feature = "cuda")]
pub const CUDA: KernelSource = KernelSource {
    op: "embedding",
    code: include_str!("../../cuda/embedding.cu"),
};

/// out [P, C] = rows `ids` (a device copy of the P ids, `GpuContext::upload_bits`, each below V: `embedding`
/// checks them on the host) of weight [V, C].
#[cfg(feature = "cuda")]
pub fn embedding_fwd_cuda(out: &mut GpuBuf, weight: &GpuBuf, ids: &GpuBuf, c: usize) -> Result<()> {
    let n = out.len();
    out.ctx().launch_1d(
        &CUDA,
        "embedding_fwd_f32",
        n,
        &[
            out.arg(),
            weight.arg(),
            ids.arg(),
            Arg::I64(n as i64),
            Arg::I64(c as i64),
        ],
    )
}

/// Adds dout [P, C] into the rows `ids` (host ids, each below V) of dweight [V, C], deterministically: see
/// the module header.
#[cfg(feature = "cuda")]
pub fn embedding_bwd_cuda(
    dweight: &mut GpuBuf,
    dout: &GpuBuf,
    ids: &[u32],
    c: usize,
) -> Result<()> {
    let v = dweight.len() / c.max(1);
    if c == 0 || dweight.len() != v * c || dout.len() != ids.len() * c {
        return Err(Error::shape(
            "embedding_bwd_cuda",
            format!(
                "dweight {} and dout {} values for {} ids of C = {c}",
                dweight.len(),
                dout.len(),
                ids.len()
            ),
        ));
    }
    if let Some((p, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= v) {
        return Err(Error::invalid(
            "embedding_bwd_cuda",
            format!("token id {id} at position {p} is out of range for V = {v}"),
        ));
    }
    let (start, positions) = group_positions(ids, v);
    let mut ids_u = Vec::new();
    let mut start_u = vec![0u32];
    for (id, w) in start.windows(2).enumerate() {
        if w[1] > w[0] {
            ids_u.push(id as u32);
            start_u.push(w[1] as u32);
        }
    }
    if ids_u.is_empty() {
        return Ok(());
    }
    let positions: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
    let ctx = dout.ctx().clone();
    let (ids_u_d, start_d, pos_d) = (
        ctx.upload_bits(&ids_u)?,
        ctx.upload_bits(&start_u)?,
        ctx.upload_bits(&positions)?,
    );
    ctx.launch(
        &CUDA,
        "embedding_bwd_f32",
        (ids_u.len() as u32, 1, 1),
        (
            c.div_ceil(32).min(crate::gpu::BLOCK as usize / 32) as u32 * 32,
            1,
            1,
        ),
        0,
        &[
            dweight.arg(),
            dout.arg(),
            ids_u_d.arg(),
            start_d.arg(),
            pos_d.arg(),
            Arg::I64(c as i64),
        ],
    )
}

pub fn embedding(tape: &mut Tape, weight: Var, ids: &[u32], shape: &[usize]) -> Result<Var> {
    let sw = tape.value(weight).shape().to_vec();
    let (v, c) = match sw[..] {
        [v, c] if c > 0 => (v, c),
        _ => {
            return Err(Error::shape(
                "embedding",
                format!("weight {sw:?} must be [V, C] with C > 0"),
            ))
        }
    };
    let positions: usize = shape.iter().product();
    if ids.len() != positions {
        return Err(Error::shape(
            "embedding",
            format!(
                "{} ids for shape {shape:?}, which needs {positions}",
                ids.len()
            ),
        ));
    }
    if let Some((p, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= v) {
        return Err(Error::invalid(
            "embedding",
            format!("token id {id} at position {p} is out of range for V = {v} (weight {sw:?})"),
        ));
    }
    let mut out_shape = shape.to_vec();
    out_shape.push(c);
    // The ids are the only state the backward needs; skip the copy when no gradient will be asked for.
    let saved = if tape.needs_grad(&[weight]) {
        ids.to_vec()
    } else {
        Vec::new()
    };
    #[cfg(feature = "cuda")]
    if let Some(ctx) = crate::gpu::device_of("embedding", &[tape.value(weight)])? {
        let mut out = ctx.alloc(positions * c)?;
        let ids_d = ctx.upload_bits(ids)?;
        embedding_fwd_cuda(&mut out, tape.value(weight).gpu("embedding")?, &ids_d, c)?;
        let out = Tensor::from_gpu(&out_shape, out)?;
        let backward = Box::new(EmbeddingBackward { ids: saved, c });
        return Ok(tape.push_op(out, &[weight], backward));
    }
    let mut out = tape.alloc(&out_shape);
    embedding_fwd_cpu(
        out.f32s_mut("embedding")?,
        tape.value(weight).f32s("embedding")?,
        ids,
        c,
    );
    Ok(tape.push_op(
        out,
        &[weight],
        Box::new(EmbeddingBackward { ids: saved, c }),
    ))
}

struct EmbeddingBackward {
    ids: Vec<u32>,
    c: usize,
}

impl Backward for EmbeddingBackward {
    fn name(&self) -> &'static str {
        "embedding"
    }
    fn backward(
        &self,
        _: &[&Tensor],
        _: &Tensor,
        dout: &Tensor,
        d: &mut [Option<Tensor>],
    ) -> Result<()> {
        #[cfg(feature = "cuda")]
        if dout.is_cuda() {
            if let Some(dw) = &mut d[0] {
                let op = "embedding_bwd";
                embedding_bwd_cuda(dw.gpu_mut(op)?, dout.gpu(op)?, &self.ids, self.c)?;
            }
            return Ok(());
        }
        if let Some(dw) = &mut d[0] {
            embedding_bwd_cpu(
                dw.f32s_mut("embedding_bwd")?,
                dout.f32s("embedding_bwd")?,
                &self.ids,
                self.c,
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{mul::mul, sum::sum};
    use crate::tensor::rng::Rng;
    use crate::testing::*;

    /// Random ids drawn from only the first half of the vocabulary, so that ids repeat and some rows of
    /// dweight get no gradient at all.
    fn ids_for(rng: &mut Rng, n: usize, v: usize) -> Vec<u32> {
        (0..n).map(|_| rng.below(v.div_ceil(2)) as u32).collect()
    }

    #[test]
    fn embedding_cpu_matches_ref_forward_and_backward() {
        let mut rng = Rng::new(71);
        for (v, c, n) in [(1, 1, 1), (5, 7, 13), (13, 33, 40), (50, 576, 64)] {
            let weight = rng.normal_vec(v * c, 1.0);
            let ids = ids_for(&mut rng, n, v);
            let dout = rng.normal_vec(n * c, 1.0);
            let mut y = vec![0.0; n * c];
            embedding_fwd_cpu(&mut y, &weight, &ids, c);
            let mut want = vec![0.0; n * c];
            embedding_fwd_ref(&mut want, &to_f64(&weight), &ids, c);
            // A copy: exact.
            assert_close(&format!("embedding fwd V={v} C={c}"), &y, &want, 0.0, 0.0);
            // Both add into the same nonzero starting gradient (a second micro-batch, say).
            let dw0 = rng.normal_vec(v * c, 1.0);
            let mut dw = dw0.clone();
            embedding_bwd_cpu(&mut dw, &dout, &ids, c);
            let mut want = to_f64(&dw0);
            embedding_bwd_ref(&mut want, &to_f64(&dout), &ids, c);
            // Sums of up to n f32 values of order 1, in the same order as the reference: a few ulp of the sum.
            assert_close(
                &format!("embedding bwd V={v} C={c}"),
                &dw,
                &want,
                1e-6,
                1e-6,
            );
        }
    }

    #[test]
    fn embedding_bwd_ref_matches_finite_differences() {
        let mut rng = Rng::new(72);
        let (v, c, n) = (6, 5, 11);
        let weight = to_f64(&rng.normal_vec(v * c, 1.0));
        let ids = ids_for(&mut rng, n, v);
        let r = to_f64(&rng.normal_vec(n * c, 1.0));
        let mut dw = vec![0.0; v * c];
        embedding_bwd_ref(&mut dw, &r, &ids, c);
        let fd = finite_diff(&weight, 1e-4, |w| {
            let mut y = vec![0.0; n * c];
            embedding_fwd_ref(&mut y, w, &ids, c);
            dot64(&y, &r)
        });
        // Linear in the weight: central differences are exact up to f64 rounding.
        assert_close_f64("embedding dweight vs fd", &dw, &fd, 1e-9, 1e-9);
    }

    #[test]
    fn embedding_repeated_ids_accumulate_in_position_order() {
        let c = 3;
        let dout: Vec<f32> = (0..4 * c).map(|i| 0.1 * i as f32 + 1.0).collect();
        let ids = [2, 0, 2, 2];
        let mut dw = vec![0.0; 4 * c];
        embedding_bwd_cpu(&mut dw, &dout, &ids, c);
        for j in 0..c {
            assert_eq!(dw[j], dout[c + j], "row 0");
            assert_eq!(dw[c + j], 0.0, "row 1 is unused");
            assert_eq!(
                dw[2 * c + j],
                dout[j] + dout[2 * c + j] + dout[3 * c + j],
                "row 2"
            );
            assert_eq!(dw[3 * c + j], 0.0, "row 3 is unused");
        }
    }

    #[test]
    fn embedding_on_tape_matches_cpu_kernels() {
        let mut rng = Rng::new(73);
        let (v, c, shape) = (9, 10, [2, 7]);
        let weight = rng.normal_vec(v * c, 1.0);
        let ids = ids_for(&mut rng, 14, v);
        let r = rng.normal_vec(14 * c, 1.0);
        let mut tape = Tape::new();
        let vw = tape
            .param(Tensor::from_vec(&[v, c], weight.clone()).unwrap())
            .unwrap();
        let y = embedding(&mut tape, vw, &ids, &shape).unwrap();
        assert_eq!(tape.value(y).shape(), &[2, 7, c]);
        let mut want = vec![0.0; 14 * c];
        embedding_fwd_cpu(&mut want, &weight, &ids, c);
        assert_eq!(tape.value(y).f32s("t").unwrap(), &want[..]);
        let vr = tape.input(Tensor::from_vec(&[2, 7, c], r.clone()).unwrap());
        let p = mul(&mut tape, y, vr).unwrap();
        let loss = sum(&mut tape, p).unwrap();
        tape.backward(loss).unwrap();
        let mut want = vec![0.0; v * c];
        embedding_bwd_cpu(&mut want, &r, &ids, c);
        assert_eq!(tape.grad(vw).unwrap().f32s("t").unwrap(), &want[..]);
    }

    #[test]
    fn embedding_rejects_bad_ids_and_shapes() {
        let mut tape = Tape::new();
        let w = tape.input(Tensor::zeros(&[5, 4]));
        let err = embedding(&mut tape, w, &[1, 5, 2], &[3])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("embedding") && err.contains("token id 5") && err.contains("V = 5"),
            "{err}"
        );
        let err = embedding(&mut tape, w, &[1, 2, 3], &[2, 2])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("embedding") && err.contains("3 ids") && err.contains("[2, 2]"),
            "{err}"
        );
        let w3 = tape.input(Tensor::zeros(&[5, 4, 1]));
        let err = embedding(&mut tape, w3, &[1], &[1])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("embedding") && err.contains("[5, 4, 1]"),
            "{err}"
        );
    }
}
