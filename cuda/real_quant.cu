// real_quant: E2E-QP's packed linear on the GPU. qweight [N, words_per_row] u32 holds row n's integers in
// PackLayout::EqatTenPerWord order: p = 32 / bits values per word (10 at 3 bits), value k in word k / p at bits
// bits * (k % p). zeros and scales are [N, K/g] (zeros as f32 values, exact up to 255).
// real_quant_dequant_f32: w[n, k] = (q - z[n, k/g]) * s[n, k/g], the CPU's f32 operations (bitwise equal).
// real_quant_dscales_f32: ds[n, j] = sum over k in group j of dw[n, k] * (q[n, k] - z[n, j]), one warp per group.

__device__ __forceinline__ float real_quant_level(const unsigned int* qweight, i64 row, i64 col, i64 wpr,
                                                  int bits) {
    const int p = 32 / bits;
    const unsigned int word = qweight[row * wpr + col / p];
    return (float)((word >> (bits * (int)(col % p))) & ((1u << bits) - 1u));
}

extern "C" __global__ void real_quant_dequant_f32(float* w, const unsigned int* qweight, const float* zeros,
                                                  const float* scales, i64 n, i64 k, i64 wpr, int bits, i64 g) {
    const i64 ng = k / g;
    for (i64 i = global_index(); i < n * k; i += grid_stride()) {
        const i64 row = i / k, col = i - row * k, j = row * ng + col / g;
        w[i] = (real_quant_level(qweight, row, col, wpr, bits) - zeros[j]) * scales[j];
    }
}

// 32 threads per group: the grid covers n_groups warps.
extern "C" __global__ void real_quant_dscales_f32(float* ds, const float* dw, const unsigned int* qweight,
                                                  const float* zeros, i64 n_groups, i64 k, i64 wpr, int bits,
                                                  i64 g) {
    const i64 ng = k / g;
    for (i64 gi = global_index() / 32; gi < n_groups; gi += grid_stride() / 32) {
        const i64 row = gi / ng, first = (gi - row * ng) * g;
        const float z = zeros[gi];
        float acc = 0.0f;
        for (i64 e = threadIdx.x & 31; e < g; e += 32) {
            const i64 col = first + e;
            acc += dw[row * k + col] * (real_quant_level(qweight, row, col, wpr, bits) - z);
        }
        acc = warp_sum(acc);
        if ((threadIdx.x & 31) == 0) ds[gi] = acc;
    }
}
