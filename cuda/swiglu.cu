// swiglu: y = silu(gate) * up, elementwise. Backward with s = sigmoid(gate):
//   dgate = dy * up * s * (1 + gate * (1 - s)),  dup = dy * gate * s   (either output may be null).
// expf of a large argument gives +inf and 1/(1+inf) = 0, the right limit, so no clamp is needed here.

__device__ __forceinline__ float sigmoid_f32(float x) { return 1.0f / (1.0f + expf(-x)); }

// out_b, when not null, gets bf16(out) too: the operand of the next bf16 GEMM, without a separate cast pass.
extern "C" __global__ void swiglu_fwd_f32(float* out, unsigned short* out_b, const float* gate, const float* up,
                                          i64 n) {
    for (i64 i = global_index(); i < n; i += grid_stride()) {
        const float g = gate[i];
        const float y = g * sigmoid_f32(g) * up[i];
        out[i] = y;
        if (out_b) out_b[i] = (unsigned short)bf16_bits(y);
    }
}

extern "C" __global__ void swiglu_bwd_f32(float* dgate, float* dup, const float* dout, const float* gate,
                                          const float* up, i64 n) {
    for (i64 i = global_index(); i < n; i += grid_stride()) {
        const float g = gate[i], dy = dout[i], s = sigmoid_f32(g);
        if (dgate) dgate[i] = dy * up[i] * s * (1.0f + g * (1.0f - s));
        if (dup) dup[i] = dy * g * s;
    }
}

// The bf16 mode's MLP keeps gate, up, y and their gradients in bf16, as torch.autocast does (the f32 math above,
// bf16 in and out, rounded to nearest even). A thread takes 8 adjacent values (16-byte accesses); the last,
// partial chunk goes value by value.
__device__ __forceinline__ float bf16_to_f32(unsigned short b) { return __uint_as_float((unsigned)b << 16); }

struct bf16x8 {
    unsigned short v[8];
};
__device__ __forceinline__ bf16x8 load_bf16x8(const unsigned short* p, i64 i, i64 n) {
    bf16x8 r;
    if (i + 8 <= n) {
        *reinterpret_cast<uint4*>(r.v) = *reinterpret_cast<const uint4*>(p + i);
    } else {
        for (int e = 0; e < 8; e++) r.v[e] = i + e < n ? p[i + e] : 0;
    }
    return r;
}
__device__ __forceinline__ void store_bf16x8(unsigned short* p, const bf16x8& r, i64 i, i64 n) {
    if (i + 8 <= n) {
        *reinterpret_cast<uint4*>(p + i) = *reinterpret_cast<const uint4*>(r.v);
    } else {
        for (int e = 0; e < 8 && i + e < n; e++) p[i + e] = r.v[e];
    }
}

extern "C" __global__ void swiglu_fwd_bf16(unsigned short* out, const unsigned short* gate, const unsigned short* up,
                                           i64 n) {
    for (i64 i = 8 * global_index(); i < n; i += 8 * grid_stride()) {
        const bf16x8 g = load_bf16x8(gate, i, n), u = load_bf16x8(up, i, n);
        bf16x8 y;
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const float gv = bf16_to_f32(g.v[e]);
            y.v[e] = (unsigned short)bf16_bits(gv * sigmoid_f32(gv) * bf16_to_f32(u.v[e]));
        }
        store_bf16x8(out, y, i, n);
    }
}

extern "C" __global__ void swiglu_bwd_bf16(unsigned short* dgate, unsigned short* dup, const unsigned short* dout,
                                           const unsigned short* gate, const unsigned short* up, i64 n) {
    for (i64 i = 8 * global_index(); i < n; i += 8 * grid_stride()) {
        const bf16x8 d = load_bf16x8(dout, i, n), g = load_bf16x8(gate, i, n), u = load_bf16x8(up, i, n);
        bf16x8 dg, du;
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const float gv = bf16_to_f32(g.v[e]), dy = bf16_to_f32(d.v[e]), s = sigmoid_f32(gv);
            dg.v[e] = (unsigned short)bf16_bits(dy * bf16_to_f32(u.v[e]) * s * (1.0f + gv * (1.0f - s)));
            du.v[e] = (unsigned short)bf16_bits(dy * gv * s);
        }
        if (dgate) store_bf16x8(dgate, dg, i, n);
        if (dup) store_bf16x8(dup, du, i, n);
    }
}
