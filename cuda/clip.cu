// clip: the global gradient norm of clip_grad_norm on the GPU (src/train/clip.rs).
// clip_sum_squares_f32: block b of a fixed grid sums g[i]^2 over its grid-stride share in f64 and writes the
// partial to partials[b] (rounded to f32); the host adds the partials in f64. A fixed grid and block_sum's fixed
// order make the result deterministic. clip_scale_f32: g *= coef in place.

extern "C" __global__ void clip_sum_squares_f32(float* partials, const float* g, i64 n) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (i64 i = global_index(); i < n; i += grid_stride()) {
        const double x = (double)g[i];
        acc += x * x;
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = (float)acc;
}

extern "C" __global__ void clip_scale_f32(float* g, i64 n, float coef) {
    for (i64 i = global_index(); i < n; i += grid_stride()) g[i] *= coef;
}
