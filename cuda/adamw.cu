// AdamW, torch.optim.AdamW's single-tensor update in its operation order (src/train/adamw/mod.rs):
//   p *= decay;  m += (1 - b1) (g - m);  v = b2 v + (1 - b2) g^2;  p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
// (`adamw_elem` in the prelude). The f64 scalars are computed on the host per parameter (AdamWCoefs).
// adamw_check_f32 flags a non-finite gradient before any parameter moves (flags[k] = 1 for parameter k).

extern "C" __global__ void adamw_update_f32(float* p, const float* g, float* m, float* v, i64 n, float decay,
                                            float beta2, float one_minus_beta1, float one_minus_beta2,
                                            float step_size, float bias_correction2_sqrt, float eps) {
    const AdamWCoefs c = {decay, beta2, one_minus_beta1, one_minus_beta2, step_size, bias_correction2_sqrt, eps};
    for (i64 i = global_index(); i < n; i += grid_stride()) {
        float mi = m[i], vi = v[i];
        p[i] = adamw_elem(p[i], g[i], mi, vi, c);
        m[i] = mi;
        v[i] = vi;
    }
}

extern "C" __global__ void adamw_check_f32(float* flags, int k, const float* g, i64 n) {
    for (i64 i = global_index(); i < n; i += grid_stride())
        if (!isfinite(g[i])) flags[k] = 1.0f;  // every writer stores the same value: the race is benign
}

// One weight's update with the gradient of its fake-quantized value: per group, fake-quant's backward turns dŵ into
// dw, ds, dz (fake_quant_bwd_f32's arithmetic and summation order), AdamW moves w (coefficients cw), the scale and
// the zero point (cq), and the next forward's ŵ is written in bf16 from the updated values (fake_quant_fwd_bf16's
// arithmetic). One pass instead of three kernels (backward, update, forward): 30 bytes per weight instead of 50,
// with bit-identical results. One warp per group; with g a multiple of 64 each lane takes adjacent pairs (8-byte
// accesses), as fake_quant_bwd_f32 does. The group's six scalars are loaded with its weights (one memory latency
// per group, not three), and for g <= 256 a lane keeps its updated weights in registers for the bf16 pass; other
// group sizes re-read the weights the lane itself wrote.
#define ADAMW_FQ_MAX_PAIRS 4
extern "C" __global__ void adamw_fake_quant_f32(
    float* w, float* mw, float* vw, const float* dwq, float* scales, float* ms, float* vs, float* zeros, float* mz,
    float* vz, unsigned short* wq, i64 n_groups, i64 g, float qmax, float w_decay, float w_beta2, float w_omb1,
    float w_omb2, float w_step_size, float w_bc2_sqrt, float w_eps, float q_decay, float q_beta2, float q_omb1,
    float q_omb2, float q_step_size, float q_bc2_sqrt, float q_eps) {
    const AdamWCoefs cw = {w_decay, w_beta2, w_omb1, w_omb2, w_step_size, w_bc2_sqrt, w_eps};
    const AdamWCoefs cq = {q_decay, q_beta2, q_omb1, q_omb2, q_step_size, q_bc2_sqrt, q_eps};
    const int lane = threadIdx.x & 31;
    const i64 warps = (i64)gridDim.x * (blockDim.x >> 5);
    const bool pairs = (g & 63) == 0;
    const bool in_regs = pairs && g <= 64 * ADAMW_FQ_MAX_PAIRS;
    for (i64 j = global_index() >> 5; j < n_groups; j += warps) {
        const float s_raw = scales[j], z_raw = zeros[j];
        float msj = ms[j], vsj = vs[j], mzj = mz[j], vzj = vz[j];
        const float s = fake_quant_scale(s_raw);
        const float zr = fake_quant_zero(z_raw, qmax);
        float ds_acc = 0.0f, clamped = 0.0f;
        float2 kept[ADAMW_FQ_MAX_PAIRS];
        if (in_regs) {
#pragma unroll
            for (int t = 0; t < ADAMW_FQ_MAX_PAIRS; t++) {
                const i64 e = 2 * lane + 64 * t;
                if (e >= g) break;
                const i64 i = j * g + e;  // even, and g is even: 8-byte aligned
                const float2 gv = *reinterpret_cast<const float2*>(dwq + i);
                float2 wv = *reinterpret_cast<const float2*>(w + i);
                float2 mv = *reinterpret_cast<const float2*>(mw + i);
                float2 vv = *reinterpret_cast<const float2*>(vw + i);
                const float dx = fake_quant_bwd_elem(gv.x, wv.x, s, zr, qmax, ds_acc, clamped);
                const float dy = fake_quant_bwd_elem(gv.y, wv.y, s, zr, qmax, ds_acc, clamped);
                wv.x = adamw_elem(wv.x, dx, mv.x, vv.x, cw);
                wv.y = adamw_elem(wv.y, dy, mv.y, vv.y, cw);
                *reinterpret_cast<float2*>(w + i) = wv;
                *reinterpret_cast<float2*>(mw + i) = mv;
                *reinterpret_cast<float2*>(vw + i) = vv;
                kept[t] = wv;
            }
        } else {
            for (i64 e = pairs ? 2 * lane : lane; e < g; e += pairs ? 64 : 32) {
                const i64 i = j * g + e;
                float mi = mw[i], vi = vw[i];
                if (pairs) {
                    const float d0 = fake_quant_bwd_elem(dwq[i], w[i], s, zr, qmax, ds_acc, clamped);
                    const float d1 = fake_quant_bwd_elem(dwq[i + 1], w[i + 1], s, zr, qmax, ds_acc, clamped);
                    float mi1 = mw[i + 1], vi1 = vw[i + 1];
                    w[i + 1] = adamw_elem(w[i + 1], d1, mi1, vi1, cw);
                    mw[i + 1] = mi1;
                    vw[i + 1] = vi1;
                    w[i] = adamw_elem(w[i], d0, mi, vi, cw);
                } else {
                    const float d = fake_quant_bwd_elem(dwq[i], w[i], s, zr, qmax, ds_acc, clamped);
                    w[i] = adamw_elem(w[i], d, mi, vi, cw);
                }
                mw[i] = mi;
                vw[i] = vi;
            }
        }
        // Every lane holds the sums (xor butterfly), so every lane computes the same new scale and zero point.
        const float ds = warp_sum(ds_acc);
        const float dz = -s * warp_sum(clamped);
        const float s_new = adamw_elem(s_raw, ds, msj, vsj, cq);
        const float z_new = adamw_elem(z_raw, dz, mzj, vzj, cq);
        if (lane == 0) {
            scales[j] = s_new;
            ms[j] = msj;
            vs[j] = vsj;
            zeros[j] = z_new;
            mz[j] = mzj;
            vz[j] = vzj;
        }
        const float s2 = fake_quant_scale(s_new), zr2 = fake_quant_zero(z_new, qmax);
        if (in_regs) {
#pragma unroll
            for (int t = 0; t < ADAMW_FQ_MAX_PAIRS; t++) {
                const i64 e = 2 * lane + 64 * t;
                if (e >= g) break;
                const unsigned int lo = bf16_bits(fake_quant_value(kept[t].x, s2, zr2, qmax));
                const unsigned int hi = bf16_bits(fake_quant_value(kept[t].y, s2, zr2, qmax));
                reinterpret_cast<unsigned int*>(wq)[(j * g + e) / 2] = lo | (hi << 16);
            }
        } else {
            // The same elements as the first pass: each lane reads back only its own writes.
            for (i64 e = pairs ? 2 * lane : lane; e < g; e += pairs ? 64 : 32) {
                const i64 i = j * g + e;
                wq[i] = (unsigned short)bf16_bits(fake_quant_value(w[i], s2, zr2, qmax));
                if (pairs) wq[i + 1] = (unsigned short)bf16_bits(fake_quant_value(w[i + 1], s2, zr2, qmax));
            }
        }
    }
}
