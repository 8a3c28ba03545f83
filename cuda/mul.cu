// mul: out = a * b with b broadcast over a's leading rows (b has nb values; a has n, a multiple of nb).
// Backward: da = dout * b (mul_fwd_f32 on dout), db[j] = sum over rows of a[r, j] * dout[r, j] (mul_bwd_f32).

extern "C" __global__ void mul_fwd_f32(float* out, const float* a, const float* b, i64 n, i64 nb) {
    for (i64 i = global_index(); i < n; i += grid_stride()) out[i] = a[i] * b[i % nb];
}

// Column sums of the products a * dout [rows, nb] into db [nb], add_bwd_f32's scheme: block (32, 8), 32 adjacent
// columns, 8 row phases added in a fixed order (deterministic, no atomics).
extern "C" __global__ void mul_bwd_f32(float* db, const float* a, const float* dout, i64 rows, i64 nb) {
    __shared__ float part[8][33];
    const i64 col = (i64)blockIdx.x * 32 + threadIdx.x;
    float acc = 0.0f;
    if (col < nb)
        for (i64 r = threadIdx.y; r < rows; r += 8) acc += a[r * nb + col] * dout[r * nb + col];
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < nb) {
        float s = 0.0f;
        for (int y = 0; y < 8; y++) s += part[y][threadIdx.x];
        db[col] = s;
    }
}
