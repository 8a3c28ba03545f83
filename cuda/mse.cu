// mse: loss = mean((pred - target)^2), a scalar. The squares are summed in f64: each block writes one partial
// sum, and mse_fwd_sum_f32 (one block) adds the partials in a fixed order, so the loss is deterministic.
// Backward: g = 2 * dout / n (dout read on the device, no host round trip); dpred = (p - t) * g,
// dtarget = (p - t) * -g (either may be null), in the CPU path's operation order.

// dpred_root, when not null, gets mse_bwd_f32's dpred for dout = 1 (the same bits): the gradient of a loss that
// backward starts from, written while pred and target are read anyway; dpred_root_b, when not null, its bf16
// rounding (the gradient's bf16 twin, for a linear that reads it next).
extern "C" __global__ void mse_fwd_f32(double* partial, float* dpred_root, unsigned short* dpred_root_b,
                                       const float* pred, const float* target, i64 n) {
    __shared__ double scratch[32];
    const float g = (float)(2.0 * 1.0 / (double)n);
    double acc = 0.0;
    for (i64 i = global_index(); i < n; i += grid_stride()) {
        const float d = pred[i] - target[i];
        acc += (double)d * (double)d;
        if (dpred_root) dpred_root[i] = d * g;
        if (dpred_root_b) dpred_root_b[i] = (unsigned short)bf16_bits(d * g);
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// One block of at least n_partial threads (n_partial <= 1024).
extern "C" __global__ void mse_fwd_sum_f32(float* loss, const double* partial, int n_partial, i64 n) {
    __shared__ double scratch[32];
    double v = (int)threadIdx.x < n_partial ? partial[threadIdx.x] : 0.0;
    v = block_sum(v, scratch);
    if (threadIdx.x == 0) loss[0] = (float)(v / (double)n);
}

extern "C" __global__ void mse_bwd_f32(float* dpred, float* dtarget, const float* pred, const float* target,
                                       const float* dout, i64 n) {
    const float g = (float)(2.0 * (double)dout[0] / (double)n);
    for (i64 i = global_index(); i < n; i += grid_stride()) {
        const float d = pred[i] - target[i];
        if (dpred) dpred[i] = d * g;
        if (dtarget) dtarget[i] = d * -g;
    }
}
