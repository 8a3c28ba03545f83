// AdamW, torch.optim.AdamW's single-tensor update in its operation order (src/train/adamw/mod.rs):
//   p *= decay;  m += (1 - b1) (g - m);  v = b2 v + (1 - b2) g^2;  p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
// (`adamw_elem` in the prelude). The f64 scalars are computed on the host per parameter (AdamWCoefs).
// adamw_check_f32 (and _bf16) flags a non-finite gradient before any parameter moves (flags[k] = 1 for parameter k).

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

// The same check of bf16 values: all exponent bits set is an infinity or a NaN.
extern "C" __global__ void adamw_check_bf16(float* flags, int k, const unsigned short* g, i64 n) {
    for (i64 i = global_index(); i < n; i += grid_stride())
        if ((g[i] & 0x7f80u) == 0x7f80u) flags[k] = 1.0f;
}
