// transpose: x seen as [outer, n0, mid, n1, inner] (the swapped dims n0, n1) becomes out
// [outer, n1, mid, n0, inner]. One thread per output element (grid-stride), reading its source: the writes are
// coalesced, and the reads too whenever inner >= 32 (the attention layout swaps); the backward is the same
// kernel with n0 and n1 exchanged.

extern "C" __global__ void transpose_fwd_f32(float* out, const float* x, i64 n, i64 n0, i64 mid, i64 n1,
                                             i64 inner) {
    for (i64 o = global_index(); o < n; o += grid_stride()) {
        i64 t = o / inner;
        const i64 e = o - t * inner;
        const i64 i = t % n0;
        t /= n0;
        const i64 m = t % mid;
        t /= mid;
        const i64 j = t % n1;
        const i64 outer = t / n1;
        out[o] = x[(((outer * n0 + i) * mid + m) * n1 + j) * inner + e];
    }
}
