//! Plain f64 loops: the reference the fast path and the finite-difference checks are held to. The backward
//! recomputes P row by row and uses rowsum(P∘dP) for the softmax correction, which equals the fast path's
//! rowsum(dO∘O) in exact arithmetic, so the two paths check each other's algebra too.
use super::AttentionShape;

/// Index of element (b, t, head, 0) in a [B, T, heads, D] tensor.
fn at(s: AttentionShape, heads: usize, b: usize, t: usize, head: usize) -> usize {
    ((b * s.t + t) * heads + head) * s.d
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Softmax probabilities of query row (b, t, h) over keys 0..=t.
fn probs(q: &[f64], k: &[f64], s: AttentionShape, b: usize, t: usize, h: usize) -> Vec<f64> {
    let (d, kvh) = (s.d, h / s.group());
    let qi = at(s, s.h, b, t, h);
    let scores: Vec<f64> = (0..=t)
        .map(|j| s.scale() * dot(&q[qi..qi + d], &k[at(s, s.g, b, j, kvh)..][..d]))
        .collect();
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|x| x / sum).collect()
}

/// out [B, T, H, D] = causal softmax(scale · Q·Kᵀ) · V per head, key/value head h / (H/G).
pub fn attention_fwd_ref(out: &mut [f64], q: &[f64], k: &[f64], v: &[f64], s: AttentionShape) {
    let (d, group) = (s.d, s.group());
    for b in 0..s.b {
        for t in 0..s.t {
            for h in 0..s.h {
                let p = probs(q, k, s, b, t, h);
                let o = &mut out[at(s, s.h, b, t, h)..][..d];
                o.fill(0.0);
                for (j, pj) in p.iter().enumerate() {
                    let vj = &v[at(s, s.g, b, j, h / group)..][..d];
                    for (o, vj) in o.iter_mut().zip(vj) {
                        *o += pj * vj;
                    }
                }
            }
        }
    }
}

/// Writes dq [B, T, H, D], dk and dv [B, T, G, D] for upstream gradient dout [B, T, H, D].
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd_ref(
    dq: &mut [f64],
    dk: &mut [f64],
    dv: &mut [f64],
    dout: &[f64],
    q: &[f64],
    k: &[f64],
    v: &[f64],
    s: AttentionShape,
) {
    let (d, group, scale) = (s.d, s.group(), s.scale());
    dq.fill(0.0);
    dk.fill(0.0);
    dv.fill(0.0);
    for b in 0..s.b {
        for t in 0..s.t {
            for h in 0..s.h {
                let p = probs(q, k, s, b, t, h);
                let (qi, kvh) = (at(s, s.h, b, t, h), h / group);
                let g_out = &dout[qi..qi + d];
                let dp: Vec<f64> = (0..=t)
                    .map(|j| dot(g_out, &v[at(s, s.g, b, j, kvh)..][..d]))
                    .collect();
                let correction = dot(&p, &dp);
                for j in 0..=t {
                    let kj = at(s, s.g, b, j, kvh);
                    let ds = p[j] * (dp[j] - correction);
                    for c in 0..d {
                        dq[qi + c] += scale * ds * k[kj + c];
                        dk[kj + c] += scale * ds * q[qi + c];
                        dv[kj + c] += p[j] * g_out[c];
                    }
                }
            }
        }
    }
}
