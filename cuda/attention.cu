// attention: causal grouped-query attention (see src/ops/attention/mod.rs), q [B, T, H, D], k and v [B, T, G, D],
// out [B, T, H, D], lse [B, H, T]; query head h reads key/value head h / (H/G). FlashAttention-2's recipe in f32
// on the CUDA cores: nothing of size T² ever reaches device memory.
//
// Tiles: 64 query rows x 64 keys per step, 256 threads as a 16 x 16 grid (ty = tid / 16, tx = tid % 16). Scores
// and probabilities of a step: thread (ty, tx) holds rows ty*4 + i and keys tx + 16*j (i, j < 4). Products whose
// output is [rows, D]: rows ty*4 + i and columns tx*4 + 64*c .. +4 (c < DMAX/64). Shared-memory rows are padded
// by 4 floats, which keeps float4 alignment and puts the 16 keys a half-warp reads in different banks.
// DMAX (64 or 128) is the compiled head dim; a smaller d is zero-padded in shared memory and never written out.
//
// Forward: online softmax over the key tiles 0..q0 (the causal mask only bites in the diagonal tile); lse =
// m + log(l), the log-sum-exp of the scaled scores, which is all the backward needs to rebuild P = exp(S - lse).
// Backward: attention_delta_f32 computes delta = rowsum(dO∘O); attention_bwd_f32_* runs one block per
// (64-key block, batch, query head) and loops over the query blocks at or after it, accumulating dK and dV in
// registers (written, `=`) and adding each block's share of dQ into dq with atomics (so dq must start zeroed and
// its low bits depend on the order the blocks finish). With H > G the launcher gives per-query-head dK/dV
// buffers [B, T, H, D] and attention_sum_groups_f32 adds each group of H/G heads.

#define ATT_BQ 64
#define ATT_BK 64
#define ATT_THREADS 256
#define ATT_NEG_INF (-__int_as_float(0x7f800000))

// Copies rows [t0, t0 + 64) of head `head` of batch b of a [B, T, heads, d] tensor into a [64][DMAX + 4] tile,
// zero past row T and past column d (zeros, never stale values: a 0 probability times a NaN would be NaN).
template <int DMAX>
__device__ __forceinline__ void att_load_tile(float* tile, const float* src, int b, int t0, int head, int heads,
                                              int t, int d) {
    constexpr int S = DMAX + 4, ROWS = ATT_THREADS / DMAX;  // each thread keeps one column, every ROWS-th row
    const int c = threadIdx.x % DMAX, r0 = threadIdx.x / DMAX;
    const float* p = src + (((i64)b * t + t0 + r0) * heads + head) * d + c;
    const i64 step = (i64)ROWS * heads * d;
#pragma unroll
    for (int it = 0; it < 64 / ROWS; it++) {
        const int r = r0 + it * ROWS;
        tile[r * S + c] = (t0 + r < t && c < d) ? p[it * step] : 0.0f;
    }
}

__device__ __forceinline__ float att_dot4(float acc, float4 a, float4 b) {
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
    acc = fmaf(a.z, b.z, acc);
    return fmaf(a.w, b.w, acc);
}

__device__ __forceinline__ void att_axpy4(float4& acc, float a, float4 x) {
    acc.x = fmaf(a, x.x, acc.x);
    acc.y = fmaf(a, x.y, acc.y);
    acc.z = fmaf(a, x.z, acc.z);
    acc.w = fmaf(a, x.w, acc.w);
}

__device__ __forceinline__ float att_get(float4 v, int e) { return e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w; }

// Max and sum over the 16 lanes that share a row (tx is the low 4 bits of the lane).
__device__ __forceinline__ float att_row_max(float v) {
    for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float att_row_sum(float v) {
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// s[i][j] = sum_c a[ty*4 + i][c] * b[tx + 16 j][c] over DMAX columns of two [64][DMAX + 4] tiles.
template <int DMAX>
__device__ __forceinline__ void att_scores(float (&s)[4][4], const float* a, const float* bt, int ty, int tx) {
    constexpr int S = DMAX + 4;
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) s[i][j] = 0.0f;
#pragma unroll 2
    for (int c = 0; c < DMAX; c += 4) {
        float4 x[4], y[4];
#pragma unroll
        for (int i = 0; i < 4; i++) x[i] = *reinterpret_cast<const float4*>(&a[(ty * 4 + i) * S + c]);
#pragma unroll
        for (int j = 0; j < 4; j++) y[j] = *reinterpret_cast<const float4*>(&bt[(tx + 16 * j) * S + c]);
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) s[i][j] = att_dot4(s[i][j], x[i], y[j]);
    }
}

// acc[i][c] += sum_k p[ty*4 + i][k] * v[k][tx*4 + 64 c ..] for p a [64][64 + 4] tile and v a [64][DMAX + 4] tile.
template <int DMAX>
__device__ __forceinline__ void att_rows_times_tile(float4 (&acc)[4][DMAX / 64], const float* p, const float* v,
                                                    int ty, int tx) {
    constexpr int S = DMAX + 4, PS = ATT_BK + 4, NC = DMAX / 64;
#pragma unroll 1
    for (int kk = 0; kk < ATT_BK; kk += 4) {
        float4 pr[4];
#pragma unroll
        for (int i = 0; i < 4; i++) pr[i] = *reinterpret_cast<const float4*>(&p[(ty * 4 + i) * PS + kk]);
#pragma unroll
        for (int e = 0; e < 4; e++)
#pragma unroll
            for (int c = 0; c < NC; c++) {
                const float4 x = *reinterpret_cast<const float4*>(&v[(kk + e) * S + tx * 4 + 64 * c]);
#pragma unroll
                for (int i = 0; i < 4; i++) att_axpy4(acc[i][c], att_get(pr[i], e), x);
            }
    }
}

template <int DMAX>
__device__ void attention_fwd(float* out, float* lse, const float* q, const float* k, const float* v, int nb, int t,
                              int h, int g, int d, float scale) {
    constexpr int S = DMAX + 4, PS = ATT_BK + 4, NC = DMAX / 64;
    extern __shared__ float4 att_smem[];
    float* qs = reinterpret_cast<float*>(att_smem);
    float* ks = qs + ATT_BQ * S;
    float* vs = ks + ATT_BK * S;
    float* ps = vs + ATT_BK * S;
    const int nqb = (t + ATT_BQ - 1) / ATT_BQ;
    const int bh = blockIdx.x % (nb * h);
    const int qb = nqb - 1 - blockIdx.x / (nb * h);  // the longest rows start first
    const int b = bh / h, head = bh % h, kvh = head / (h / g), q0 = qb * ATT_BQ;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    att_load_tile<DMAX>(qs, q, b, q0, head, h, t, d);
    float4 acc[4][NC];
    float m[4], l[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        m[i] = ATT_NEG_INF;
        l[i] = 0.0f;
#pragma unroll
        for (int c = 0; c < NC; c++) acc[i][c] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    // Key tiles start at or before q0 (BQ == BK), so each holds key k0 <= every row: a row's max is finite.
    for (int k0 = 0; k0 <= q0; k0 += ATT_BK) {
        __syncthreads();  // the previous tile's readers are done
        att_load_tile<DMAX>(ks, k, b, k0, kvh, g, t, d);
        att_load_tile<DMAX>(vs, v, b, k0, kvh, g, t, d);
        __syncthreads();
        float s[4][4];
        att_scores<DMAX>(s, qs, ks, ty, tx);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int qi = q0 + ty * 4 + i;
            float mx = ATT_NEG_INF;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int kj = k0 + tx + 16 * j;
                s[i][j] = (kj <= qi && kj < t) ? s[i][j] * scale : ATT_NEG_INF;
                mx = fmaxf(mx, s[i][j]);
            }
            const float m_new = fmaxf(m[i], att_row_max(mx));
            const float corr = expf(m[i] - m_new);  // 0 on the first tile (m = -inf)
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float p = expf(s[i][j] - m_new);
                ps[(ty * 4 + i) * PS + tx + 16 * j] = p;
                sum += p;
            }
            l[i] = l[i] * corr + att_row_sum(sum);
            m[i] = m_new;
#pragma unroll
            for (int c = 0; c < NC; c++) {
                acc[i][c].x *= corr;
                acc[i][c].y *= corr;
                acc[i][c].z *= corr;
                acc[i][c].w *= corr;
            }
        }
        __syncthreads();  // ps complete
        att_rows_times_tile<DMAX>(acc, ps, vs, ty, tx);
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int qi = q0 + ty * 4 + i;
        if (qi >= t) continue;
        const float inv = 1.0f / l[i];
        float* o = out + (((i64)b * t + qi) * h + head) * d;
#pragma unroll
        for (int c = 0; c < NC; c++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int col = tx * 4 + 64 * c + e;
                if (col < d) o[col] = att_get(acc[i][c], e) * inv;
            }
        if (tx == 0) lse[((i64)b * h + head) * t + qi] = m[i] + logf(l[i]);
    }
}

template <int DMAX>
__device__ void attention_bwd(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                              const float* v, const float* lse, const float* delta, int nb, int t, int h, int g,
                              int d, float scale) {
    constexpr int S = DMAX + 4, PS = ATT_BK + 4, NC = DMAX / 64;
    extern __shared__ float4 att_smem[];
    float* ks = reinterpret_cast<float*>(att_smem);
    float* vs = ks + ATT_BK * S;
    float* qs = vs + ATT_BK * S;
    float* dos = qs + ATT_BQ * S;
    float* ps = dos + ATT_BQ * S;
    float* dss = ps + ATT_BQ * PS;
    const int bh = blockIdx.x % (nb * h);
    const int kb = blockIdx.x / (nb * h);  // key block 0 meets every query block: it starts first
    const int b = bh / h, head = bh % h, kvh = head / (h / g), k0 = kb * ATT_BK;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    const float* lse_h = lse + ((i64)b * h + head) * t;
    const float* delta_h = delta + ((i64)b * h + head) * t;
    att_load_tile<DMAX>(ks, k, b, k0, kvh, g, t, d);
    att_load_tile<DMAX>(vs, v, b, k0, kvh, g, t, d);
    // dK and dV rows k0 + ty*4 + i, columns tx*4 + 64 c ..
    float4 dka[4][NC], dva[4][NC];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int c = 0; c < NC; c++) {
            dka[i][c] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            dva[i][c] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
    for (int q0 = k0; q0 < t; q0 += ATT_BQ) {
        __syncthreads();  // the previous block's readers of qs, dos, ps, dss are done
        att_load_tile<DMAX>(qs, q, b, q0, head, h, t, d);
        att_load_tile<DMAX>(dos, dout, b, q0, head, h, t, d);
        __syncthreads();
        float s[4][4], dp[4][4];
        att_scores<DMAX>(s, qs, ks, ty, tx);
        att_scores<DMAX>(dp, dos, vs, ty, tx);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int qi = q0 + ty * 4 + i;
            const float row_lse = qi < t ? lse_h[qi] : 0.0f, row_delta = qi < t ? delta_h[qi] : 0.0f;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int kj = k0 + tx + 16 * j;
                const float p = (qi < t && kj <= qi) ? expf(s[i][j] * scale - row_lse) : 0.0f;
                ps[(ty * 4 + i) * PS + tx + 16 * j] = p;
                dss[(ty * 4 + i) * PS + tx + 16 * j] = p * (dp[i][j] - row_delta);
            }
        }
        __syncthreads();  // ps and dss complete
        // dV += Pᵀ·dO and dK += dSᵀ·Q (scale applied once at the end), rows = keys of this block.
#pragma unroll 2
        for (int r = 0; r < ATT_BQ; r++) {
            const float4 p4 = *reinterpret_cast<const float4*>(&ps[r * PS + ty * 4]);
            const float4 ds4 = *reinterpret_cast<const float4*>(&dss[r * PS + ty * 4]);
#pragma unroll
            for (int c = 0; c < NC; c++) {
                const float4 o = *reinterpret_cast<const float4*>(&dos[r * S + tx * 4 + 64 * c]);
                const float4 x = *reinterpret_cast<const float4*>(&qs[r * S + tx * 4 + 64 * c]);
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    att_axpy4(dva[i][c], att_get(p4, i), o);
                    att_axpy4(dka[i][c], att_get(ds4, i), x);
                }
            }
        }
        if (dq) {
            // This key block's share of dQ = scale·dS·K for the query rows q0 + ty*4 + i.
            float4 dqa[4][NC];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int c = 0; c < NC; c++) dqa[i][c] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            att_rows_times_tile<DMAX>(dqa, dss, ks, ty, tx);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int qi = q0 + ty * 4 + i;
                if (qi >= t) continue;
                float* o = dq + (((i64)b * t + qi) * h + head) * d;
#pragma unroll
                for (int c = 0; c < NC; c++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int col = tx * 4 + 64 * c + e;
                        if (col < d) atomicAdd(&o[col], att_get(dqa[i][c], e) * scale);
                    }
            }
        }
    }
    // dK and dV of this query head, [B, T, H, D] (the caller sums each group when H > G).
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int kj = k0 + ty * 4 + i;
        if (kj >= t) continue;
        const i64 row = (((i64)b * t + kj) * h + head) * d;
#pragma unroll
        for (int c = 0; c < NC; c++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int col = tx * 4 + 64 * c + e;
                if (col >= d) continue;
                if (dk) dk[row + col] = att_get(dka[i][c], e) * scale;
                if (dv) dv[row + col] = att_get(dva[i][c], e);
            }
    }
}

// Grid: ceil(T/64) * B * H blocks of 256 threads; dynamic shared memory (3 * 64 * (DMAX + 4) + 64 * 68) floats.
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 2) attention_fwd_f32_d64(
    float* out, float* lse, const float* q, const float* k, const float* v, int nb, int t, int h, int g, int d,
    float scale) {
    attention_fwd<64>(out, lse, q, k, v, nb, t, h, g, d, scale);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_fwd_f32_d128(
    float* out, float* lse, const float* q, const float* k, const float* v, int nb, int t, int h, int g, int d,
    float scale) {
    attention_fwd<128>(out, lse, q, k, v, nb, t, h, g, d, scale);
}

// Grid: ceil(T/64) * B * H blocks of 256 threads; dynamic shared memory (4 * 64 * (DMAX + 4) + 2 * 64 * 68)
// floats. dq must be zeroed (or null); dk, dv [B, T, H, D] are written (each may be null).
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 2) attention_bwd_f32_d64(
    float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k, const float* v,
    const float* lse, const float* delta, int nb, int t, int h, int g, int d, float scale) {
    attention_bwd<64>(dq, dk, dv, dout, q, k, v, lse, delta, nb, t, h, g, d, scale);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_f32_d128(
    float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k, const float* v,
    const float* lse, const float* delta, int nb, int t, int h, int g, int d, float scale) {
    attention_bwd<128>(dq, dk, dv, dout, q, k, v, lse, delta, nb, t, h, g, d, scale);
}

// delta [B, H, T] = rowsum(dout ∘ out) over d, one warp per row of [B, T, H, D] (rows = B*T*H).
extern "C" __global__ void attention_delta_f32(float* delta, const float* dout, const float* out, i64 rows, int t,
                                               int h, int d) {
    const int lane = threadIdx.x & 31;
    const i64 warps = grid_stride() / 32;
    for (i64 row = global_index() / 32; row < rows; row += warps) {
        const float* a = dout + row * d;
        const float* o = out + row * d;
        float acc = 0.0f;
        for (int c = lane; c < d; c += 32) acc = fmaf(a[c], o[c], acc);
        acc = warp_sum(acc);
        // row = (b*T + tt)*H + head -> delta index (b*H + head)*T + tt
        const i64 head = row % h, bt = row / h, tt = bt % t, b = bt / t;
        if (lane == 0) delta[(b * h + head) * t + tt] = acc;
    }
}

// dst [B, T, G, D] = sum over the H/G query heads of each group of src [B, T, H, D]; n = B*T*G*D.
extern "C" __global__ void attention_sum_groups_f32(float* dst, const float* src, i64 n, int h, int g, int d) {
    const int group = h / g;
    for (i64 i = global_index(); i < n; i += grid_stride()) {
        const i64 c = i % d, row = i / d;  // row = bt*G + kv head
        const i64 kvh = row % g, bt = row / g;
        const float* s = src + (bt * h + kvh * group) * d + c;
        float acc = 0.0f;
        for (int r = 0; r < group; r++) acc += s[(i64)r * d];
        dst[i] = acc;
    }
}
