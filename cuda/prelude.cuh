// Prepended to every cuda/<op>.cu before NVRTC compiles it (NVRTC has no include path): shared helpers only,
// no kernels. Kernels are `extern "C"` and named <op>_fwd_f32 / <op>_bwd_f32 (helpers of an op carry its prefix).
// Pointers of optional outputs may be null (the launcher passes 0 for a gradient nobody needs).

typedef long long i64;

// Position in a 1-D grid-stride loop, in 64 bits so that tensors past 2^31 elements index correctly.
__device__ __forceinline__ i64 global_index() { return (i64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ i64 grid_stride() { return (i64)gridDim.x * blockDim.x; }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over a 1-D block (blockDim.x a multiple of 32, at most 1024); every thread gets the total, always added in
// the same order, so results are deterministic. `scratch` is __shared__ T[32]; it may be reused by the next call.
template <typename T>
__device__ T block_sum(T v, T* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // the previous call's readers are done with scratch
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : (T)0;
    return warp_sum(v);
}

// f32 -> bf16 bits, rounding to nearest even (as __float2bfloat16_rn; NaN stays a quiet NaN). Written out because
// NVRTC has no include path for cuda_bf16.h. bf16 values travel as unsigned short.
__device__ __forceinline__ unsigned int bf16_bits(float f) {
    const unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// AdamW's per-element update in torch's operation order (src/train/adamw/mod.rs), for cuda/adamw.cu and the fused
// step in cuda/fake_quant.cu; the f32 constants come from
// AdamWCoefs (computed in f64 on the host). Updates m and v, returns the new parameter. Every operation is rounded
// on its own (__f*_rn are never contracted into FMAs; sqrtf and the divisions are IEEE): the same f32 operations
// as adamw_update_cpu, and the same bits in every kernel that inlines this, whatever the compiler fuses around it.
struct AdamWCoefs {
    float decay, beta2, one_minus_beta1, one_minus_beta2, step_size, bias_correction2_sqrt, eps;
};
__device__ __forceinline__ float adamw_elem(float p, float g, float& m, float& v, const AdamWCoefs& c) {
    m = __fadd_rn(m, __fmul_rn(c.one_minus_beta1, __fsub_rn(g, m)));
    v = __fadd_rn(__fmul_rn(v, c.beta2), __fmul_rn(__fmul_rn(c.one_minus_beta2, g), g));
    const float denom = __fadd_rn(__fdiv_rn(sqrtf(v), c.bias_correction2_sqrt), c.eps);
    return __fadd_rn(__fmul_rn(p, c.decay), __fmul_rn(-c.step_size, __fdiv_rn(m, denom)));
}
