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
