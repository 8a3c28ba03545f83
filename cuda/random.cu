// random: counter-based random fills for synthetic device tensors (benchmarks): element i of a fill with `seed`
// takes the 64-bit hash splitmix64(seed ^ splitmix64(i)), so the values do not depend on the launch shape.
// Bits: the low 32 bits of the hash. Uniform: the top 24 bits as a fraction u in [0, 1), then lo + (hi - lo)·u (which
// can round up to hi). Normal: Box-Muller on two 24-bit fractions of the hash.

__device__ __forceinline__ unsigned long long random_mix(unsigned long long z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

extern "C" __global__ void random_uniform_f32(float* out, i64 n, unsigned long long seed, float lo, float hi) {
    for (i64 i = global_index(); i < n; i += grid_stride()) {
        const unsigned long long h = random_mix(seed ^ random_mix((unsigned long long)i));
        out[i] = lo + (hi - lo) * ((float)(h >> 40) * 0x1p-24f);
    }
}

extern "C" __global__ void random_normal_f32(float* out, i64 n, unsigned long long seed, float mean, float std) {
    for (i64 i = global_index(); i < n; i += grid_stride()) {
        const unsigned long long h = random_mix(seed ^ random_mix((unsigned long long)i));
        const float u1 = ((float)(h >> 40) + 1.0f) * 0x1p-24f;  // (0, 1]: the log stays finite
        const float u2 = (float)(h & 0xffffffull) * 0x1p-24f;
        out[i] = mean + std * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
    }
}

extern "C" __global__ void random_bits_u32(unsigned int* out, i64 n, unsigned long long seed) {
    for (i64 i = global_index(); i < n; i += grid_stride())
        out[i] = (unsigned int)random_mix(seed ^ random_mix((unsigned long long)i));
}
