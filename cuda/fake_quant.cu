// fake_quant: EfficientQAT's asymmetric uniform quantizer per group of g consecutive weights (one row of w
// [N, K] holds K/g groups; group j has scales[j], zeros[j]). See src/quant/fake_quant/mod.rs for the formulas:
//   s = clamp(scale, 1e-4, 1e4), zr = clamp(rint(zero), 0, qmax), x = w / s, p = rint(x) + zr,
//   q = clamp(p, 0, qmax), out = (q - zr) * s;  m = [0 <= p <= qmax]
//   dw = dout * m,  ds = sum_group dout * (q - zr - m * x),  dz = -s * sum_{group, !m} dout
// The per-value helpers (fake_quant_scale, fake_quant_zero, fake_quant_value, fake_quant_bwd_elem) are in the
// prelude: AdamW's fused step (cuda/adamw.cu) runs the same arithmetic.

extern "C" __global__ void fake_quant_fwd_f32(float* out, const float* w, const float* scales, const float* zeros,
                                              i64 n, i64 g, float qmax) {
    for (i64 i = global_index(); i < n; i += grid_stride()) {
        const i64 j = i / g;
        out[i] = fake_quant_value(w[i], fake_quant_scale(scales[j]), fake_quant_zero(zeros[j], qmax), qmax);
    }
}

// One warp per group: lanes stride over the group's g elements, then a warp sum gives ds and dz. dw, ds and dz
// may each be null. When g is a multiple of 64 each lane takes two adjacent elements per step (8-byte loads and
// stores, all of a 64-group's loads issued at once); the memory-bound kernel ran at 71% of the copy bandwidth
// with one element per lane.
extern "C" __global__ void fake_quant_bwd_f32(float* dw, float* ds, float* dz, const float* dout, const float* w,
                                              const float* scales, const float* zeros, i64 n_groups, i64 g,
                                              float qmax) {
    const int lane = threadIdx.x & 31;
    const i64 warps = (i64)gridDim.x * (blockDim.x >> 5);
    const bool pairs = (g & 63) == 0;
    for (i64 j = global_index() >> 5; j < n_groups; j += warps) {
        const float s = fake_quant_scale(scales[j]);
        const float zr = fake_quant_zero(zeros[j], qmax);
        float ds_acc = 0.0f, clamped = 0.0f;
        if (pairs) {
            for (i64 e = 2 * lane; e < g; e += 64) {
                const i64 i = j * g + e;  // even, and g is even: 8-byte aligned
                const float2 gv = *reinterpret_cast<const float2*>(dout + i);
                const float2 wv = *reinterpret_cast<const float2*>(w + i);
                float2 d;
                d.x = fake_quant_bwd_elem(gv.x, wv.x, s, zr, qmax, ds_acc, clamped);
                d.y = fake_quant_bwd_elem(gv.y, wv.y, s, zr, qmax, ds_acc, clamped);
                if (dw) *reinterpret_cast<float2*>(dw + i) = d;
            }
        } else {
            for (i64 e = lane; e < g; e += 32) {
                const i64 i = j * g + e;
                const float d = fake_quant_bwd_elem(dout[i], w[i], s, zr, qmax, ds_acc, clamped);
                if (dw) dw[i] = d;
            }
        }
        ds_acc = warp_sum(ds_acc);
        clamped = warp_sum(clamped);
        if (lane == 0) {
            if (ds) ds[j] = ds_acc;
            if (dz) dz[j] = -s * clamped;
        }
    }
}

// Min-max init (see the module header), one warp per group: s = clamp((xmax - xmin) / qmax, 1e-4, 1e4),
// z = rint(-clamp(xmin / s, -1e4, 1e4)). min, max, IEEE division and rintf give the CPU path's values exactly.
// A non-finite weight sets bad[0] = 1 (the launcher turns that into an error).
extern "C" __global__ void fake_quant_init_minmax_f32(float* scales, float* zeros, float* bad, const float* w,
                                                      i64 n_groups, i64 g, float qmax) {
    const int lane = threadIdx.x & 31;
    const i64 warps = (i64)gridDim.x * (blockDim.x >> 5);
    for (i64 j = global_index() >> 5; j < n_groups; j += warps) {
        float lo = __int_as_float(0x7f800000), hi = -lo;  // +inf, -inf
        bool finite = true;
        for (i64 e = lane; e < g; e += 32) {
            const float v = w[j * g + e];
            finite = finite && (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
            lo = fminf(lo, v);
            hi = fmaxf(hi, v);
        }
        for (int o = 16; o > 0; o >>= 1) {
            lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
            hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
        }
        if (!__all_sync(0xffffffffu, finite) && lane == 0) bad[0] = 1.0f;
        if (lane == 0) {
            const float s = fake_quant_scale((hi - lo) / qmax);
            scales[j] = s;
            zeros[j] = rintf(-fminf(fmaxf(lo / s, -1e4f), 1e4f));
        }
    }
}

// The forward written straight to bf16 (the bf16 mixed-precision mode's GEMM operand): out[i] = bf16(ŵ[i]),
// ŵ as fake_quant_fwd_f32. Four values per thread (16-byte loads, 8-byte stores; the launcher checks that n is a
// multiple of 4); each value looks up its own group, so g need not be.
extern "C" __global__ void fake_quant_fwd_bf16(unsigned short* out, const float* w, const float* scales,
                                               const float* zeros, i64 n, i64 g, float qmax) {
    const i64 quads = n / 4;
    for (i64 q = global_index(); q < quads; q += grid_stride()) {
        const float4 v = reinterpret_cast<const float4*>(w)[q];
        const float x[4] = {v.x, v.y, v.z, v.w};
        unsigned int b[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const i64 j = (q * 4 + e) / g;
            b[e] = bf16_bits(fake_quant_value(x[e], fake_quant_scale(scales[j]), fake_quant_zero(zeros[j], qmax), qmax));
        }
        reinterpret_cast<uint2*>(out)[q] = make_uint2(b[0] | (b[1] << 16), b[2] | (b[3] << 16));
    }
}
