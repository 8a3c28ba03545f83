// rope: rotary position embedding of x [B, T, H, D], pair i of each head rotated by theta_i(t), whose cos and
// sin come from the host-built f32 table [T, D/2] (angles in f64, as on the CPU). layout 0 = HalfSplit (dims
// i, i + D/2), 1 = Interleaved (dims 2i, 2i + 1). Backward is the rotation by -theta: the same kernel body
// with sin negated. One thread per (row, head, pair).

__device__ __forceinline__ void rope_rotate(float* y, const float* x, const float* cos_t, const float* sin_t,
                                            i64 n_pairs, int t, int h, int d, int layout, float sign) {
    const int half = d / 2;
    for (i64 k = global_index(); k < n_pairs; k += grid_stride()) {
        const int i = (int)(k % half);
        const i64 head = k / half;            // index of (row, head)
        const int tt = (int)((head / h) % t);  // row = b * T + t
        const float c = cos_t[(i64)tt * half + i], s = sign * sin_t[(i64)tt * half + i];
        const i64 base = head * d;
        const i64 a = base + (layout == 0 ? i : 2 * i), b = base + (layout == 0 ? i + half : 2 * i + 1);
        const float xa = x[a], xb = x[b];
        y[a] = xa * c - xb * s;
        y[b] = xa * s + xb * c;
    }
}

extern "C" __global__ void rope_fwd_f32(float* out, const float* x, const float* cos_t, const float* sin_t,
                                        i64 n_pairs, int t, int h, int d, int layout) {
    rope_rotate(out, x, cos_t, sin_t, n_pairs, t, h, d, layout, 1.0f);
}

extern "C" __global__ void rope_bwd_f32(float* dx, const float* dout, const float* cos_t, const float* sin_t,
                                        i64 n_pairs, int t, int h, int d, int layout) {
    rope_rotate(dx, dout, cos_t, sin_t, n_pairs, t, h, d, layout, -1.0f);
}
