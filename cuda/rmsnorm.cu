// rmsnorm: y = x * rstd * w per row of c values, rstd = 1 / sqrt(mean(x^2) + eps); rstd is saved per row.
// Backward (see src/ops/rmsnorm.rs): with k = rstd^3 * sum_i(w_i dy_i x_i) / c,
//   dx_i = rstd * w_i * dy_i - k * x_i       dw_i = sum over rows of dy_i * x_i * rstd
// dw is computed as per-block partials [blocks, c] (rows_per_block rows each), which add_bwd_f32 then sums in
// block order: deterministic, no atomics.

// One block per row. out_b, when not null, gets bf16(out) too: the operand of the next bf16 GEMM.
extern "C" __global__ void rmsnorm_fwd_f32(float* out, unsigned short* out_b, float* rstd, const float* x,
                                           const float* w, int c, float eps) {
    __shared__ float scratch[32];
    const i64 row = blockIdx.x;
    const float* xr = x + row * c;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    // 1/sqrtf rather than rsqrtf: the approximate rsqrtf is off by up to 2 ulp, the CPU path is exact.
    const float r = 1.0f / sqrtf(ss / (float)c + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    float* o = out + row * c;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        const float y = xr[i] * r * w[i];
        o[i] = y;
        if (out_b) out_b[row * c + i] = (unsigned short)bf16_bits(y);
    }
}

// Block b handles rows [b * rows_per_block, ...). dx and dw_partial may each be null. With accumulate_dx, dx
// holds a gradient already (the residual stream's) and the row's dx is added to it.
extern "C" __global__ void rmsnorm_bwd_f32(float* dx, float* dw_partial, const float* dout, const float* x,
                                           const float* w, const float* rstd, i64 rows, int c,
                                           int rows_per_block, int accumulate_dx) {
    __shared__ float scratch[32];
    const i64 first = (i64)blockIdx.x * rows_per_block;
    const i64 last = min(first + rows_per_block, rows);
    if (dx) {
        for (i64 row = first; row < last; row++) {
            const float* xr = x + row * c;
            const float* dy = dout + row * c;
            float s = 0.0f;
            for (int i = threadIdx.x; i < c; i += blockDim.x) s += w[i] * dy[i] * xr[i];
            s = block_sum(s, scratch);
            const float r = rstd[row];
            const float k = r * r * r * s / (float)c;
            float* d = dx + row * c;
            for (int i = threadIdx.x; i < c; i += blockDim.x) {
                const float v = r * w[i] * dy[i] - k * xr[i];
                d[i] = accumulate_dx ? d[i] + v : v;
            }
        }
    }
    if (dw_partial) {
        for (int i = threadIdx.x; i < c; i += blockDim.x) {
            float acc = 0.0f;
            for (i64 row = first; row < last; row++) acc += dout[row * c + i] * x[row * c + i] * rstd[row];
            dw_partial[(i64)blockIdx.x * c + i] = acc;
        }
    }
}
