// real_quant: E2E-QP's packed linear on the GPU. qweight [N, words_per_row] u32 holds row n's integers in
// PackLayout::EqatTenPerWord order: p = 32 / bits values per word (10 at 3 bits), value k in word k / p at bits
// bits * (k % p). qzeros [N, zero_words_per_row] packs row n's K/g zero points the same way; scales are [N, K/g].
// real_quant_dequant_f32: w[n, k] = (q - z[n, k/g]) * s[n, k/g], the CPU's f32 operations (bitwise equal).
// real_quant_dequant_bf16: the same value rounded to bf16 (as linear_cast_bf16 of the f32 result, bit for bit).
// real_quant_dscales_f32: ds[n, j] = sum over k in group j of dw[n, k] * (q[n, k] - z[n, j]), one warp per group;
// real_quant_dscales_f32_teams the same with 8 lanes per group (g and K multiples of 8).

// Index arithmetic is 32-bit (the launchers check that N·K < 2^32): 64-bit division is a long software routine on
// the GPU, and with three of them per value the bf16 dequant ran at 309 GB/s.
__device__ __forceinline__ float real_quant_level(const unsigned int* words, unsigned row, unsigned col,
                                                  unsigned wpr, int bits) {
    const unsigned p = 32 / bits;
    const unsigned int word = words[row * wpr + col / p];
    return (float)((word >> (bits * (col % p))) & ((1u << bits) - 1u));
}

extern "C" __global__ void real_quant_dequant_f32(float* w, const unsigned int* qweight,
                                                  const unsigned int* qzeros, const float* scales, i64 n, i64 k,
                                                  i64 wpr, i64 zwpr, int bits, i64 g) {
    const unsigned K = k, G = g, ng = K / G;
    for (i64 i = global_index(); i < n * k; i += grid_stride()) {
        const unsigned row = (unsigned)i / K, col = (unsigned)i - row * K, gj = col / G;
        const float z = real_quant_level(qzeros, row, gj, zwpr, bits);
        w[i] = (real_quant_level(qweight, row, col, wpr, bits) - z) * scales[row * ng + gj];
    }
}

// One packed word per thread: its P = 32 / BITS values (the same f32 operations as real_quant_dequant_f32, then
// bf16_bits), the zero point and scale reloaded only where the word crosses into the next group. At 2 and 4 bits
// (P = 16 or 8, compile-time) the word's bf16 values are gathered in registers and written as 16-byte stores when
// the word is whole and aligned (the usual case); otherwise, and at other widths, value by value. Writing 4 bytes
// at a time the kernel moved 50% more DRAM bytes than it needed and ran at 623 GB/s.
template <int BITS>
__device__ __forceinline__ void real_quant_dequant_word(unsigned short* w, unsigned int word,
                                                        const unsigned int* qzeros, const float* scales,
                                                        unsigned row, unsigned c0, unsigned K, unsigned G,
                                                        unsigned zwpr) {
    constexpr unsigned P = 32 / BITS, MASK = (1u << BITS) - 1u;
    const unsigned ng = K / G;
    unsigned gj = c0 / G, next = (gj + 1) * G;
    float z = real_quant_level(qzeros, row, gj, zwpr, BITS), s = scales[row * ng + gj];
    const unsigned base = row * K + c0;
    const bool vector = P % 8 == 0 && c0 + P <= K && base % 8 == 0;  // whole 16-byte stores (2 and 4 bits)
    unsigned int pairs[(P + 1) / 2];
#pragma unroll
    for (unsigned e = 0; e < P; e++) {
        if (c0 + e >= K) break;
        if (c0 + e == next) {  // the word's values from here on belong to the next group
            gj++;
            next += G;
            z = real_quant_level(qzeros, row, gj, zwpr, BITS);
            s = scales[row * ng + gj];
        }
        const unsigned b = bf16_bits(((float)((word >> (BITS * e)) & MASK) - z) * s);
        if (!vector) {
            w[base + e] = (unsigned short)b;
        } else {
            pairs[e / 2] = e % 2 ? pairs[e / 2] | (b << 16) : b;
        }
    }
    if (vector) {
#pragma unroll
        for (unsigned q = 0; q < P / 8; q++)
            reinterpret_cast<uint4*>(w + base)[q] =
                make_uint4(pairs[4 * q], pairs[4 * q + 1], pairs[4 * q + 2], pairs[4 * q + 3]);
    }
}

extern "C" __global__ void real_quant_dequant_bf16(unsigned short* w, const unsigned int* qweight,
                                                   const unsigned int* qzeros, const float* scales, i64 n,
                                                   i64 k, i64 wpr, i64 zwpr, int bits, i64 g) {
    const unsigned K = k, G = g, WPR = wpr, ZWPR = zwpr, p = 32 / bits;  // bits: one of SUPPORTED_BITS
    for (i64 t = global_index(); t < n * wpr; t += grid_stride()) {
        const unsigned row = (unsigned)t / WPR, c0 = ((unsigned)t - row * WPR) * p;
        const unsigned int word = qweight[t];
        switch (bits) {
            case 2: real_quant_dequant_word<2>(w, word, qzeros, scales, row, c0, K, G, ZWPR); break;
            case 3: real_quant_dequant_word<3>(w, word, qzeros, scales, row, c0, K, G, ZWPR); break;
            case 4: real_quant_dequant_word<4>(w, word, qzeros, scales, row, c0, K, G, ZWPR); break;
            default: real_quant_dequant_word<8>(w, word, qzeros, scales, row, c0, K, G, ZWPR);  // 8 bits
        }
    }
}

// 32 threads per group: the grid covers n_groups warps.
extern "C" __global__ void real_quant_dscales_f32(float* ds, const float* dw, const unsigned int* qweight,
                                                  const unsigned int* qzeros, i64 n_groups, i64 k, i64 wpr,
                                                  i64 zwpr, int bits, i64 g) {
    const unsigned K = k, G = g, ng = K / G;
    for (i64 gi = global_index() / 32; gi < n_groups; gi += grid_stride() / 32) {
        const unsigned row = (unsigned)gi / ng, gj = (unsigned)gi - row * ng, first = gj * G;
        const float z = real_quant_level(qzeros, row, gj, zwpr, bits);
        float acc = 0.0f;
        for (unsigned e = threadIdx.x & 31; e < G; e += 32) {
            const unsigned col = first + e;
            acc += dw[row * K + col] * (real_quant_level(qweight, row, col, wpr, bits) - z);
        }
        acc = warp_sum(acc);
        if ((threadIdx.x & 31) == 0) ds[gi] = acc;
    }
}

// real_quant_dscales_f32 with a team of 8 lanes per group (4 groups per warp), each lane 8 adjacent values of every
// 64 (two 16-byte loads of dw; at 2 and 4 bits their levels come from one packed word): with one warp per group
// and one value per lane the kernel ran at 1.25 TB/s. The launcher takes it when g and K are multiples of 8.
template <int BITS>
__device__ __forceinline__ float real_quant_dscales_chunk(const float* dw, const unsigned int* qweight, unsigned row,
                                                          unsigned col, unsigned K, unsigned wpr, float z) {
    const float4 a = *reinterpret_cast<const float4*>(dw + row * K + col);
    const float4 b = *reinterpret_cast<const float4*>(dw + row * K + col + 4);
    const float d[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    float acc = 0.0f;
    constexpr unsigned P = 32 / BITS, MASK = (1u << BITS) - 1u;
    if (P % 8 == 0) {  // the 8 values share one word
        const unsigned word = qweight[row * wpr + col / P], shift = BITS * (col % P);
#pragma unroll
        for (int e = 0; e < 8; e++) acc += d[e] * ((float)((word >> (shift + BITS * e)) & MASK) - z);
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) acc += d[e] * (real_quant_level(qweight, row, col + e, wpr, BITS) - z);
    }
    return acc;
}

extern "C" __global__ void real_quant_dscales_f32_teams(float* ds, const float* dw, const unsigned int* qweight,
                                                        const unsigned int* qzeros, i64 n_groups, i64 k, i64 wpr,
                                                        i64 zwpr, int bits, i64 g) {
    const unsigned K = k, G = g, ng = K / G, lane = threadIdx.x & 31, tl = lane % 8;
    const i64 warps = (i64)gridDim.x * (blockDim.x >> 5);
    for (i64 first = (global_index() >> 5) * 4; first < n_groups; first += warps * 4) {
        const i64 gi = first + lane / 8;
        float acc = 0.0f;
        if (gi < n_groups) {
            const unsigned row = (unsigned)gi / ng, gj = (unsigned)gi - row * ng;
            const float z = real_quant_level(qzeros, row, gj, zwpr, bits);
            for (unsigned c = gj * G + 8 * tl; c < (gj + 1) * G; c += 64) {
                switch (bits) {
                    case 2: acc += real_quant_dscales_chunk<2>(dw, qweight, row, c, K, wpr, z); break;
                    case 4: acc += real_quant_dscales_chunk<4>(dw, qweight, row, c, K, wpr, z); break;
                    case 8: acc += real_quant_dscales_chunk<8>(dw, qweight, row, c, K, wpr, z); break;
                    default: acc += real_quant_dscales_chunk<3>(dw, qweight, row, c, K, wpr, z);
                }
            }
        }
        for (int o = 4; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (gi < n_groups && tl == 0) ds[gi] = acc;
    }
}
