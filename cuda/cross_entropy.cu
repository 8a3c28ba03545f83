// cross_entropy: per row r of V logits with a counted target t (t != ignore_index),
//   nll[r] = max + log(sum_i exp(x_i - max)) - x_t,
// one block per row: the max in one pass, the exponentials in a second (the row is back from L2), each thread
// adding its exps in f32 and the block adding the threads' sums in f64. As on the CPU, max and log_sum are kept
// apart (a single f32 log-sum-exp near 1000 would be off by half an ulp) and saved for the backward.
// A NaN logit makes its row's max NaN (nan_max), hence its nll and gradients NaN, as in torch.
// cross_entropy_loss_f32 adds the f64 nll of all rows in a fixed order and divides by the count: deterministic.
// Backward: dlogits = (exp((x - max) - log_sum) - onehot(t)) * scale with scale = dout / count read on the device;
// 0 for ignored rows.

__device__ __forceinline__ float cross_entropy_nan_max(float a, float b) {
    return (a != a || b != b) ? __int_as_float(0x7fc00000) : fmaxf(a, b);
}

__device__ float cross_entropy_block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = cross_entropy_nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : __int_as_float(0xff800000);  // -inf
    for (int o = 16; o > 0; o >>= 1) v = cross_entropy_nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// nll [rows] f64 (0 for ignored rows); lse_max, lse_log_sum [rows] f32 (unwritten for ignored rows).
extern "C" __global__ void cross_entropy_fwd_f32(double* nll, float* lse_max, float* lse_log_sum,
                                                 const float* logits, const int* targets, int ignore_index,
                                                 i64 v) {
    __shared__ float fscratch[32];
    __shared__ double dscratch[32];
    const i64 row = blockIdx.x;
    const int t = targets[row];
    if (t == ignore_index) {  // the whole block takes this branch: no barrier is left waiting
        if (threadIdx.x == 0) nll[row] = 0.0;
        return;
    }
    const float* x = logits + row * v;
    float m = __int_as_float(0xff800000);
    for (i64 i = threadIdx.x; i < v; i += blockDim.x) m = cross_entropy_nan_max(m, x[i]);
    m = cross_entropy_block_max(m, fscratch);
    float s = 0.0f;
    for (i64 i = threadIdx.x; i < v; i += blockDim.x) s += expf(x[i] - m);
    const double log_sum = log(block_sum((double)s, dscratch));
    if (threadIdx.x == 0) {
        nll[row] = (double)m + log_sum - (double)x[t];
        lse_max[row] = m;
        lse_log_sum[row] = (float)log_sum;
    }
}

// One block: loss[0] = (sum of nll over all rows, in a fixed order) / count.
extern "C" __global__ void cross_entropy_loss_f32(float* loss, const double* nll, i64 rows, i64 count) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (i64 r = threadIdx.x; r < rows; r += blockDim.x) acc += nll[r];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) loss[0] = (float)(acc / (double)count);
}

// One block per row.
extern "C" __global__ void cross_entropy_bwd_f32(float* dlogits, const float* logits, const int* targets,
                                                 int ignore_index, const float* lse_max,
                                                 const float* lse_log_sum, const float* dout, i64 count,
                                                 i64 v) {
    const i64 row = blockIdx.x;
    const int t = targets[row];
    float* d = dlogits + row * v;
    if (t == ignore_index) {
        for (i64 i = threadIdx.x; i < v; i += blockDim.x) d[i] = 0.0f;
        return;
    }
    const float scale = (float)((double)dout[0] / (double)count);
    const float m = lse_max[row], ls = lse_log_sum[row];
    const float* x = logits + row * v;
    for (i64 i = threadIdx.x; i < v; i += blockDim.x) {
        const float p = expf((x[i] - m) - ls) * scale;
        d[i] = i == t ? p - scale : p;
    }
}
