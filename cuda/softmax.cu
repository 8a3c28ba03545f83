// softmax over rows of c values: y = exp(x - max) / sum(exp(x - max)), one block per row (the row max keeps every
// exponent <= 0; -inf entries give exactly 0). As on the CPU, y = e * (1 / total).
// Backward from the saved output: dx = y * (dy - sum_j dy_j * y_j), one block per row.

// Max over a 1-D block (blockDim.x a multiple of 32); every thread gets it. `scratch` is __shared__ float[32].
__device__ float softmax_block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : __int_as_float(0xff800000);  // -inf
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

extern "C" __global__ void softmax_fwd_f32(float* out, const float* x, int c) {
    __shared__ float scratch[32];
    const float* xr = x + (i64)blockIdx.x * c;
    float* o = out + (i64)blockIdx.x * c;
    float m = __int_as_float(0xff800000);
    for (int i = threadIdx.x; i < c; i += blockDim.x) m = fmaxf(m, xr[i]);
    m = softmax_block_max(m, scratch);
    float total = 0.0f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        const float e = expf(xr[i] - m);
        o[i] = e;
        total += e;
    }
    total = block_sum(total, scratch);
    const float inv = 1.0f / total;
    // Each thread rescales the entries it wrote itself: no barrier needed between the two loops.
    for (int i = threadIdx.x; i < c; i += blockDim.x) o[i] *= inv;
}

extern "C" __global__ void softmax_bwd_f32(float* dx, const float* dout, const float* y, int c) {
    __shared__ float scratch[32];
    const i64 base = (i64)blockIdx.x * c;
    float s = 0.0f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) s += dout[base + i] * y[base + i];
    s = block_sum(s, scratch);
    for (int i = threadIdx.x; i < c; i += blockDim.x) dx[base + i] = y[base + i] * (dout[base + i] - s);
}
