// linear: the operand cast of the bf16 mixed-precision mode (the GEMMs themselves are cuBLAS GemmEx).
// out[i] = bf16(x[i]), round to nearest even; four values per thread (16-byte loads, 8-byte stores) and a tail.

extern "C" __global__ void linear_cast_bf16(unsigned short* out, const float* x, i64 n) {
    const i64 quads = n / 4;
    for (i64 i = global_index(); i < quads; i += grid_stride()) {
        const float4 v = reinterpret_cast<const float4*>(x)[i];
        uint2 o;
        o.x = bf16_bits(v.x) | (bf16_bits(v.y) << 16);
        o.y = bf16_bits(v.z) | (bf16_bits(v.w) << 16);
        reinterpret_cast<uint2*>(out)[i] = o;
    }
    for (i64 i = quads * 4 + global_index(); i < n; i += grid_stride()) out[i] = (unsigned short)bf16_bits(x[i]);
}
