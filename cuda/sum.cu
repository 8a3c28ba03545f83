// sum / mean of all elements to a scalar: each block of sum_fwd_f32 leaves one f64 partial sum, and
// sum_fwd_total_f32 (one block) adds the partials in a fixed order, so the result is deterministic. As on the
// CPU the f64 total is rounded to f32 and then multiplied by `scale` (1 for sum, 1/n for mean) in f32.
// Backward: every dx[i] = dout[0] * scale, dout read on the device (no host round trip).

extern "C" __global__ void sum_fwd_f32(double* partial, const float* x, i64 n) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (i64 i = global_index(); i < n; i += grid_stride()) acc += (double)x[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// One block of at least n_partial threads (n_partial <= 1024).
extern "C" __global__ void sum_fwd_total_f32(float* out, const double* partial, int n_partial, float scale) {
    __shared__ double scratch[32];
    double v = (int)threadIdx.x < n_partial ? partial[threadIdx.x] : 0.0;
    v = block_sum(v, scratch);
    if (threadIdx.x == 0) out[0] = (float)v * scale;
}

extern "C" __global__ void sum_bwd_f32(float* dx, const float* dout, float scale, i64 n) {
    const float g = dout[0] * scale;
    for (i64 i = global_index(); i < n; i += grid_stride()) dx[i] = g;
}
