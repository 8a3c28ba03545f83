// rmsnorm: y = x * rstd * w per row of c values, rstd = 1 / sqrt(mean(x^2) + eps); rstd is saved per row.
// Backward (see src/ops/rmsnorm.rs): with k = rstd^3 * sum_i(w_i dy_i x_i) / c,
//   dx_i = rstd * w_i * dy_i - k * x_i       dw_i = sum over rows of dy_i * x_i * rstd
// dw is computed as per-block partials [blocks, c] (rows_per_block rows each), which add_bwd_f32 then sums in
// block order: deterministic, no atomics.

// Both kernels keep a row in registers: thread t of a block of T threads owns columns t + T*j, j < PER (the
// launcher picks T >= c / PER), so x, dout and the gradient so far are read from DRAM once and every load of a
// row is in flight at once. PER = 8 with up to 1024 threads (c <= 8192, at most 64 registers: several blocks per
// SM hide each row's reduction); the _wide kernels take PER = 32 with up to 512 threads (c <= 16384).

// One block per row. out (f32) and rstd may be null; out_b, when not null, gets bf16(out): the operand of the next
// bf16 GEMM; xhat_b, when not null, gets bf16(x * rstd) (the folded norm's weight-gradient operand, see below).
// With res (the residual add fused in front, both or neither of res and x_sum): the norm is of x + res, which goes
// to x_sum, the same f32 sums as add_fwd_f32.
template <int PER>
__device__ void rmsnorm_fwd(float* out, unsigned short* out_b, unsigned short* xhat_b, float* rstd, const float* x,
                            const float* res, float* x_sum, const float* w, int c, float eps) {
    __shared__ float scratch[32];
    const i64 row = blockIdx.x;
    const float* xr = x + row * c;
    float v[PER];
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < PER; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        v[j] = i < c ? xr[i] : 0.0f;
        if (res && i < c) {
            v[j] = v[j] + res[row * c + i];
            x_sum[row * c + i] = v[j];
        }
        ss += v[j] * v[j];
    }
    ss = block_sum(ss, scratch);
    // 1/sqrtf rather than rsqrtf: the approximate rsqrtf is off by up to 2 ulp, the CPU path is exact.
    const float r = 1.0f / sqrtf(ss / (float)c + eps);
    if (rstd && threadIdx.x == 0) rstd[row] = r;
#pragma unroll
    for (int j = 0; j < PER; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i >= c) break;
        const float y = v[j] * r * w[i];
        if (out) out[row * c + i] = y;
        if (out_b) out_b[row * c + i] = (unsigned short)bf16_bits(y);
        if (xhat_b) xhat_b[row * c + i] = (unsigned short)bf16_bits(v[j] * r);
    }
}

// Block b handles rows [b * rows_per_block, ...), one at a time; the dw partial of a thread's columns accumulates
// in registers over the block's rows. dx and dw_partial may each be null. With accumulate_dx, dx holds a gradient
// already (the residual stream's) and the row's dx is added to it. dx_b, when not null, gets the bf16 rounding of
// what dx holds after (the gradient's bf16 twin, which a linear reads next: no cast pass).
template <int PER>
__device__ void rmsnorm_bwd(float* dx, unsigned short* dx_b, float* dw_partial, const float* dout, const float* x,
                            const float* w, const float* rstd, i64 rows, int c, int rows_per_block,
                            int accumulate_dx) {
    __shared__ float scratch[32];
    const i64 first = (i64)blockIdx.x * rows_per_block;
    const i64 last = min(first + rows_per_block, rows);
    float acc[PER];
#pragma unroll
    for (int j = 0; j < PER; j++) acc[j] = 0.0f;
    for (i64 row = first; row < last; row++) {
        const float* xr = x + row * c;
        const float* dy = dout + row * c;
        float* d = dx ? dx + row * c : nullptr;
        float xv[PER], dv[PER], old[PER];
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < PER; j++) {
            const int i = threadIdx.x + j * blockDim.x;
            const bool in = i < c;
            xv[j] = in ? xr[i] : 0.0f;
            dv[j] = in ? dy[i] : 0.0f;
            // The gradient so far is loaded with the row, not after the reduction.
            old[j] = in && d && accumulate_dx ? d[i] : 0.0f;
            if (in) s += w[i] * dv[j] * xv[j];
        }
        const float r = rstd[row];
        if (d) {
            s = block_sum(s, scratch);
            const float k = r * r * r * s / (float)c;
#pragma unroll
            for (int j = 0; j < PER; j++) {
                const int i = threadIdx.x + j * blockDim.x;
                if (i >= c) break;
                const float v = r * w[i] * dv[j] - k * xv[j];
                const float out = accumulate_dx ? old[j] + v : v;
                d[i] = out;
                if (dx_b) dx_b[row * c + i] = (unsigned short)bf16_bits(out);
            }
        }
#pragma unroll
        for (int j = 0; j < PER; j++) acc[j] += dv[j] * xv[j] * r;
    }
    if (dw_partial) {
#pragma unroll
        for (int j = 0; j < PER; j++) {
            const int i = threadIdx.x + j * blockDim.x;
            if (i >= c) break;
            dw_partial[(i64)blockIdx.x * c + i] = acc[j];
        }
    }
}

#define RMSNORM_FWD_ARGS                                                                                   \
    float *out, unsigned short *out_b, unsigned short *xhat_b, float *rstd, const float *x, const float *res, \
        float *x_sum, const float *w, int c, float eps
#define RMSNORM_BWD_ARGS                                                                                       \
    float *dx, unsigned short *dx_b, float *dw_partial, const float *dout, const float *x, const float *w,   \
        const float *rstd, i64 rows, int c, int rows_per_block, int accumulate_dx
extern "C" __global__ void __launch_bounds__(1024) rmsnorm_fwd_f32(RMSNORM_FWD_ARGS) {
    rmsnorm_fwd<8>(out, out_b, xhat_b, rstd, x, res, x_sum, w, c, eps);
}
extern "C" __global__ void __launch_bounds__(512) rmsnorm_fwd_f32_wide(RMSNORM_FWD_ARGS) {
    rmsnorm_fwd<32>(out, out_b, xhat_b, rstd, x, res, x_sum, w, c, eps);
}
extern "C" __global__ void __launch_bounds__(1024) rmsnorm_bwd_f32(RMSNORM_BWD_ARGS) {
    rmsnorm_bwd<8>(dx, dx_b, dw_partial, dout, x, w, rstd, rows, c, rows_per_block, accumulate_dx);
}
extern "C" __global__ void __launch_bounds__(512) rmsnorm_bwd_f32_wide(RMSNORM_BWD_ARGS) {
    rmsnorm_bwd<32>(dx, dx_b, dw_partial, dout, x, w, rstd, rows, c, rows_per_block, accumulate_dx);
}

// The folded norm (src/ops/rmsnorm/fold.rs): for a linear y = h·Ŵᵀ on h = x̂·diag(γ) whose input x needs no
// gradient, the GEMM gave G = dYᵀ·x̂ (bf16, [n, k]). Here dŴ = G·diag(γ) is written over G, and
// dγ_c = Σ_j Ŵ_jc·G_jc goes out as per-block partials [gridDim.y, k] (rows_per_block rows of G each), summed in
// block order by add_bwd_f32. Thread t of block (bx, by) owns columns 2(bx·blockDim.x + t) and the one after (k is
// even): 4-byte loads of bf16 pairs.
extern "C" __global__ void norm_fold_bwd(unsigned short* g, const unsigned short* wq, const float* gamma,
                                         float* dgamma_partial, i64 n, int k, int rows_per_block) {
    const int c = 2 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (c >= k) return;
    const float g0 = gamma[c], g1 = gamma[c + 1];
    const i64 first = (i64)blockIdx.y * rows_per_block;
    const i64 last = min(first + rows_per_block, n);
    float a0 = 0.0f, a1 = 0.0f;
#pragma unroll 4
    for (i64 row = first; row < last; row++) {
        unsigned int* gp = (unsigned int*)(g + row * k + c);
        const unsigned int gv = *gp;
        const unsigned int wv = *(const unsigned int*)(wq + row * k + c);
        const float x0 = __uint_as_float(gv << 16), x1 = __uint_as_float(gv & 0xffff0000u);
        a0 = fmaf(__uint_as_float(wv << 16), x0, a0);
        a1 = fmaf(__uint_as_float(wv & 0xffff0000u), x1, a1);
        *gp = bf16_bits(x0 * g0) | (bf16_bits(x1 * g1) << 16);
    }
    if (dgamma_partial) {
        dgamma_partial[(i64)blockIdx.y * k + c] = a0;
        dgamma_partial[(i64)blockIdx.y * k + c + 1] = a1;
    }
}
