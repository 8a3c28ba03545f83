// add: out = a + b with b broadcast over a's leading rows (b has nb values; a has n, a multiple of nb).
// Backward: da = dout (a device copy), db[j] = sum over rows of dout[r, j] (add_bwd_f32, which every op that
// reduces a broadcast or per-block partial gradient reuses). add_assign_f32 is the tape's `+=` of gradients.

extern "C" __global__ void add_fwd_f32(float* out, const float* a, const float* b, i64 n, i64 nb) {
    for (i64 i = global_index(); i < n; i += grid_stride()) out[i] = a[i] + b[i % nb];
}

// Column sums of dout [rows, nb] into db [nb]. Block (32, 8): 32 adjacent columns (coalesced reads), 8 row
// phases; the 8 partial sums of a column are then added in a fixed order, so the result is deterministic.
extern "C" __global__ void add_bwd_f32(float* db, const float* dout, i64 rows, i64 nb) {
    __shared__ float part[8][33];
    const i64 col = (i64)blockIdx.x * 32 + threadIdx.x;
    float acc = 0.0f;
    if (col < nb)
        for (i64 r = threadIdx.y; r < rows; r += 8) acc += dout[r * nb + col];
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < nb) {
        float s = 0.0f;
        for (int y = 0; y < 8; y++) s += part[y][threadIdx.x];
        db[col] = s;
    }
}

extern "C" __global__ void add_assign_f32(float* dst, const float* src, i64 n) {
    for (i64 i = global_index(); i < n; i += grid_stride()) dst[i] += src[i];
}
