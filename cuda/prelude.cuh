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
