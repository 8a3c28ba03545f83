// rope: rotary position embedding of x [B, T, H, D], pair i of each head rotated by theta_i(t), whose cos and
// sin come from the host-built f32 table [T, D/2] (angles in f64, as on the CPU). layout 0 = HalfSplit (dims
// i, i + D/2), 1 = Interleaved (dims 2i, 2i + 1). Backward is the rotation by -theta: the same kernel body
// with sin negated. One thread per (row, head, pair). The bf16 kernels (the bf16 mode's q and k, and their
// gradients) do the same f32 arithmetic on bf16 values and round each output once, to nearest even.

__device__ __forceinline__ float rope_load(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ float rope_load(const unsigned short* p, i64 i) { return __uint_as_float((unsigned)p[i] << 16); }
__device__ __forceinline__ void rope_store(float* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void rope_store(unsigned short* p, i64 i, float v) { p[i] = (unsigned short)bf16_bits(v); }

template <typename T>
__device__ __forceinline__ void rope_rotate(T* y, const T* x, const float* cos_t, const float* sin_t, i64 n_pairs,
                                            int t, int h, int d, int layout, float sign) {
    const int half = d / 2;
    for (i64 k = global_index(); k < n_pairs; k += grid_stride()) {
        const int i = (int)(k % half);
        const i64 head = k / half;            // index of (row, head)
        const int tt = (int)((head / h) % t);  // row = b * T + t
        const float c = cos_t[(i64)tt * half + i], s = sign * sin_t[(i64)tt * half + i];
        const i64 base = head * d;
        const i64 a = base + (layout == 0 ? i : 2 * i), b = base + (layout == 0 ? i + half : 2 * i + 1);
        const float xa = rope_load(x, a), xb = rope_load(x, b);
        rope_store(y, a, xa * c - xb * s);
        rope_store(y, b, xa * s + xb * c);
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

extern "C" __global__ void rope_fwd_bf16(unsigned short* out, const unsigned short* x, const float* cos_t,
                                         const float* sin_t, i64 n_pairs, int t, int h, int d, int layout) {
    rope_rotate(out, x, cos_t, sin_t, n_pairs, t, h, d, layout, 1.0f);
}

extern "C" __global__ void rope_bwd_bf16(unsigned short* dx, const unsigned short* dout, const float* cos_t,
                                         const float* sin_t, i64 n_pairs, int t, int h, int d, int layout) {
    rope_rotate(dx, dout, cos_t, sin_t, n_pairs, t, h, d, layout, -1.0f);
}
