// rope: rotary position embedding of x [B, T, H, D], pair i of each head rotated by theta_i(t), whose cos and
// sin come from the host-built f32 table [T, D/2] (angles in f64, as on the CPU). layout 0 = HalfSplit (dims
// i, i + D/2), 1 = Interleaved (dims 2i, 2i + 1). Backward is the rotation by -theta: the same kernel body
// with sin negated. One thread per (row, head, pair). The bf16 kernels (the bf16 mode's q and k, and their
// gradients) do the same f32 arithmetic on bf16 values and round each output once, to nearest even;
// rope_bwd_f32_bf16 reads an f32 gradient (attention's dq and dk, unrounded) and writes a bf16 one.

template <typename I>
__device__ __forceinline__ float rope_load(const float* p, I i) { return p[i]; }
template <typename I>
__device__ __forceinline__ float rope_load(const unsigned short* p, I i) { return __uint_as_float((unsigned)p[i] << 16); }
template <typename I>
__device__ __forceinline__ void rope_store(float* p, I i, float v) { p[i] = v; }
template <typename I>
__device__ __forceinline__ void rope_store(unsigned short* p, I i, float v) { p[i] = (unsigned short)bf16_bits(v); }

// I is the index type: 32-bit whenever the pairs fit (64-bit division costs tens of instructions a pair).
template <typename TY, typename TX, typename I>
__device__ __forceinline__ void rope_rotate_as(TY* y, const TX* x, const float* cos_t, const float* sin_t, I n_pairs,
                                               I t, I h, I d, int layout, float sign) {
    const I half = d / 2;
    for (I k = (I)global_index(); k < n_pairs; k += (I)grid_stride()) {
        const I i = k % half;
        const I head = k / half;      // index of (row, head)
        const I tt = (head / h) % t;  // row = b * T + t
        const float c = cos_t[tt * half + i], s = sign * sin_t[tt * half + i];
        const I base = head * d;
        const I a = base + (layout == 0 ? i : 2 * i), b = base + (layout == 0 ? i + half : 2 * i + 1);
        const float xa = rope_load(x, a), xb = rope_load(x, b);
        rope_store(y, a, xa * c - xb * s);
        rope_store(y, b, xa * s + xb * c);
    }
}

template <typename TY, typename TX>
__device__ __forceinline__ void rope_rotate(TY* y, const TX* x, const float* cos_t, const float* sin_t, i64 n_pairs,
                                            int t, int h, int d, int layout, float sign) {
    // 2 · n_pairs values must fit too.
    if (n_pairs < 0x7fffffffLL)
        rope_rotate_as<TY, TX, unsigned>(y, x, cos_t, sin_t, (unsigned)n_pairs, t, h, d, layout, sign);
    else
        rope_rotate_as<TY, TX, i64>(y, x, cos_t, sin_t, n_pairs, t, h, d, layout, sign);
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

extern "C" __global__ void rope_bwd_f32_bf16(unsigned short* dx, const float* dout, const float* cos_t,
                                             const float* sin_t, i64 n_pairs, int t, int h, int d, int layout) {
    rope_rotate(dx, dout, cos_t, sin_t, n_pairs, t, h, d, layout, -1.0f);
}
