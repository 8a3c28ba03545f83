// embedding: out[p, :] = weight[ids[p], :] for every position p (a gather, one thread per output value).
// Backward, deterministic and without atomics: the host groups positions by id (the CPU path's counting sort,
// from the host ids the op keeps), and one block per distinct id adds that id's dout rows into its dweight row
// in increasing position order -- the CPU's order, so the result equals the CPU's bit for bit. Rows of ids
// absent from the batch are not touched (the kernel ADDS into dweight, as the CPU path does).

extern "C" __global__ void embedding_fwd_f32(float* out, const float* weight, const unsigned int* ids, i64 n,
                                             i64 c) {
    for (i64 i = global_index(); i < n; i += grid_stride()) {
        const i64 p = i / c;
        out[i] = weight[(i64)ids[p] * c + (i - p * c)];
    }
}

// Block u: row ids_u[u] of dweight += dout[positions[start[u]]] + ... + dout[positions[start[u + 1] - 1]].
extern "C" __global__ void embedding_bwd_f32(float* dweight, const float* dout, const unsigned int* ids_u,
                                             const unsigned int* start, const unsigned int* positions, i64 c) {
    const unsigned int u = blockIdx.x;
    float* row = dweight + (i64)ids_u[u] * c;
    const unsigned int first = start[u], last = start[u + 1];
    for (i64 e = threadIdx.x; e < c; e += blockDim.x) {
        float acc = row[e];
        for (unsigned int q = first; q < last; q++) acc += dout[(i64)positions[q] * c + e];
        row[e] = acc;
    }
}
