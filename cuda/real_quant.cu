// real_quant: E2E-QP's packed linear on the GPU. qweight [N, words_per_row] u32 holds row n's integers in
// PackLayout::EqatTenPerWord order: p = 32 / bits values per word (10 at 3 bits), value k in word k / p at bits
// bits * (k % p). qzeros [N, zero_words_per_row] packs row n's K/g zero points the same way; scales are [N, K/g].
// real_quant_dequant_f32: w[n, k] = (q - z[n, k/g]) * s[n, k/g], the CPU's f32 operations (bitwise equal).
// real_quant_dequant_bf16: the same value rounded to bf16 (as linear_cast_bf16 of the f32 result, bit for bit).
// real_quant_dscales_f32: ds[n, j] = sum over k in group j of dw[n, k] * (q[n, k] - z[n, j]), one warp per group.

__device__ __forceinline__ float real_quant_level(const unsigned int* words, i64 row, i64 col, i64 wpr,
                                                  int bits) {
    const int p = 32 / bits;
    const unsigned int word = words[row * wpr + col / p];
    return (float)((word >> (bits * (int)(col % p))) & ((1u << bits) - 1u));
}

__device__ __forceinline__ float real_quant_value(const unsigned int* qweight, const unsigned int* qzeros,
                                                  const float* scales, i64 i, i64 k, i64 wpr, i64 zwpr,
                                                  int bits, i64 g) {
    const i64 row = i / k, col = i - row * k, gj = col / g;
    const float z = real_quant_level(qzeros, row, gj, zwpr, bits);
    return (real_quant_level(qweight, row, col, wpr, bits) - z) * scales[row * (k / g) + gj];
}

extern "C" __global__ void real_quant_dequant_f32(float* w, const unsigned int* qweight,
                                                  const unsigned int* qzeros, const float* scales, i64 n, i64 k,
                                                  i64 wpr, i64 zwpr, int bits, i64 g) {
    for (i64 i = global_index(); i < n * k; i += grid_stride()) {
        w[i] = real_quant_value(qweight, qzeros, scales, i, k, wpr, zwpr, bits, g);
    }
}

extern "C" __global__ void real_quant_dequant_bf16(unsigned short* w, const unsigned int* qweight,
                                                   const unsigned int* qzeros, const float* scales, i64 n,
                                                   i64 k, i64 wpr, i64 zwpr, int bits, i64 g) {
    for (i64 i = global_index(); i < n * k; i += grid_stride()) {
        w[i] = (unsigned short)bf16_bits(real_quant_value(qweight, qzeros, scales, i, k, wpr, zwpr, bits, g));
    }
}

// 32 threads per group: the grid covers n_groups warps.
extern "C" __global__ void real_quant_dscales_f32(float* ds, const float* dw, const unsigned int* qweight,
                                                  const unsigned int* qzeros, i64 n_groups, i64 k, i64 wpr,
                                                  i64 zwpr, int bits, i64 g) {
    const i64 ng = k / g;
    for (i64 gi = global_index() / 32; gi < n_groups; gi += grid_stride() / 32) {
        const i64 row = gi / ng, gj = gi - row * ng, first = gj * g;
        const float z = real_quant_level(qzeros, row, gj, zwpr, bits);
        float acc = 0.0f;
        for (i64 e = threadIdx.x & 31; e < g; e += 32) {
            const i64 col = first + e;
            acc += dw[row * k + col] * (real_quant_level(qweight, row, col, wpr, bits) - z);
        }
        acc = warp_sum(acc);
        if ((threadIdx.x & 31) == 0) ds[gi] = acc;
    }
}
