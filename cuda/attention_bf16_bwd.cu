#line 1 "cuda/attention_bf16_bwd.cu"
// The backward's prep and the mma.sync backward of the bf16 attention, appended to cuda/attention_bf16.cu (whose
// helpers it uses) by src/ops/attention/cuda_bf16.rs; the schedule is described in that file's header.

// dout_bf16 = bf16(dout) and delta [B, H, T] = rowsum(bf16(dout) ∘ out) over d, one warp per row of [B, T, H, D]
// (rows = B*T*H), two columns per lane at a time (d even).
extern "C" __global__ void attention_prep_bwd_bf16(float* delta, unsigned* dout_bf16, const float* dout,
                                                   const float* out, i64 rows, int t, int h, int d) {
    const int lane = threadIdx.x & 31;
    const i64 warps = grid_stride() / 32;
    for (i64 row = global_index() / 32; row < rows; row += warps) {
        float acc = 0.0f;
        for (int c = 2 * lane; c < d; c += 64) {
            const i64 at = row * d + c;
            const float2 x = *reinterpret_cast<const float2*>(dout + at);
            const float2 o = *reinterpret_cast<const float2*>(out + at);
            const unsigned lo = bf16_bits(x.x), hi = bf16_bits(x.y);
            dout_bf16[at / 2] = lo | (hi << 16);
            acc = fmaf(__uint_as_float(lo << 16), o.x, acc);
            acc = fmaf(__uint_as_float(hi << 16), o.y, acc);
        }
        acc = warp_sum(acc);
        // row = (b*T + tt)*H + head -> delta index (b*H + head)*T + tt
        const i64 head = row % h, bt = row / h, tt = bt % t, b = bt / t;
        if (lane == 0) delta[(b * h + head) * t + tt] = acc;
    }
}

// delta [B, H, T] = rowsum(dout ∘ out) when dout and out are bf16 already (bf16 q, k, v values: the output is bf16
// and so is its gradient), in the layout of attention_prep_bwd_bf16.
extern "C" __global__ void attention_delta_bf16(float* delta, const unsigned* dout_b, const unsigned* out_b, i64 rows,
                                                int t, int h, int d) {
    const int lane = threadIdx.x & 31;
    const i64 warps = grid_stride() / 32;
    for (i64 row = global_index() / 32; row < rows; row += warps) {
        float acc = 0.0f;
        for (int c = 2 * lane; c < d; c += 64) {
            const i64 at = (row * d + c) / 2;
            const unsigned x = dout_b[at], o = out_b[at];
            acc = fmaf(__uint_as_float(x << 16), __uint_as_float(o << 16), acc);
            acc = fmaf(__uint_as_float(x & 0xffff0000u), __uint_as_float(o & 0xffff0000u), acc);
        }
        acc = warp_sum(acc);
        const i64 head = row % h, bt = row / h, tt = bt % t, b = bt / t;
        if (lane == 0) delta[(b * h + head) * t + tt] = acc;
    }
}

// Starts copying the lse and delta of queries q0 .. q0 + 63 of head `head` into rows_s[0..64) and [64..128)
// (0 past T); the first 128 threads take one float each.
__device__ __forceinline__ void ab_stage_rows(float* rows_s, const float* lse, const float* delta, int b, int q0,
                                              int head, int h, int t) {
    if (threadIdx.x >= 2 * AB_QUERIES) return;
    const int i = threadIdx.x % AB_QUERIES, qq = q0 + i;
    const bool valid = qq < t;
    const i64 at = ((i64)b * h + head) * t + (valid ? qq : 0);
    ab_cp4(rows_s + threadIdx.x, (threadIdx.x < AB_QUERIES ? lse : delta) + at, valid);
}

// Backward. Grid: ceil(T / (16·W)) * B * G * splits blocks of 32·W threads (W warps of 16 keys; `splits` blocks
// share a key block's query blocks when there are too few key blocks to fill the GPU); dynamic shared memory
// (16·W + 4·64) * (D + 8) + 16·W * 72 bf16 (K, V, two Q and two dO tiles, dSᵀ) and 256 floats (two lse and delta
// stages). dq must be zeroed (or null); dk, dv [B, T, G, D] are written (each may be null), in f32, or in bf16 into
// dk_b, dv_b when those are given instead (bf16 k, v values); with splits > 1 they are added into f32 dk, dv, which
// must be zeroed (dk_b, dv_b unused).
template <int D, int W>
__device__ void attention_bwd_bf16(float* dq, float* dk, float* dv, bf16_t* dk_b, bf16_t* dv_b, const bf16_t* dout, const bf16_t* q,
                                   const bf16_t* k, const bf16_t* v, const float* lse, const float* delta, int nb,
                                   int t, int h, int g, float scale, int splits) {
    constexpr int SD = D + 8, SQ = AB_QUERIES + 8, KD = D / 16, ND = D / 8, BK = 16 * W, THREADS = 32 * W;
    // The dQ product: warp w takes query rows 16 (w % 4) and DQ = D / (W / 4) head-dim columns, 64 at a time.
    constexpr int DQ = D * 4 / W, DC = DQ < 64 ? DQ : 64;
    extern __shared__ uint4 ab_smem[];
    bf16_t* ks = reinterpret_cast<bf16_t*>(ab_smem);  // [BK][SD]
    bf16_t* vs = ks + BK * SD;                         // [BK][SD]
    bf16_t* qs = vs + BK * SD;                         // [2][64][SD]
    bf16_t* dos = qs + 2 * AB_QUERIES * SD;            // [2][64][SD]
    bf16_t* dss = dos + 2 * AB_QUERIES * SD;           // dSᵀ [BK keys][64 queries + 8]
    float* rows_s = reinterpret_cast<float*>(dss + BK * SQ);  // [2][lse 64, delta 64]
    const int nqb = (t + AB_QUERIES - 1) / AB_QUERIES, group = h / g;
    const int bg = blockIdx.x % (nb * g);
    const int kb = blockIdx.x / (nb * g) / splits;  // key block 0 meets every query block: it starts first
    const int split = blockIdx.x / (nb * g) % splits;
    const int b = bg / g, kvh = bg % g, k0 = kb * BK;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gi = lane / 4, ti = lane % 4;
    const int kw = k0 + warp * 16, key0 = kw + gi;  // the warp's first key; this thread's keys key0, key0 + 8
    const float c = scale * AB_LOG2E;
    const int qb0 = k0 / AB_QUERIES;            // the first query block at or after a key of the block
    const int iters = (nqb - qb0) * group;      // (query block, query head of the group) pairs
    // With splits > 1 the pairs are shared by `splits` blocks, which add their dK, dV into (zeroed) f32 dk, dv.
    const int it_first = iters * split / splits, it_end = iters * (split + 1) / splits;
    if (it_first == it_end) return;
    auto stage = [&](int it) {
        const int q0 = (qb0 + it / group) * AB_QUERIES, head = kvh * group + it % group, buf = it & 1;
        ab_load_tile<AB_QUERIES, D, THREADS>(qs + buf * AB_QUERIES * SD, q, b, q0, head, h, t);
        ab_load_tile<AB_QUERIES, D, THREADS>(dos + buf * AB_QUERIES * SD, dout, b, q0, head, h, t);
        ab_stage_rows(rows_s + buf * 2 * AB_QUERIES, lse, delta, b, q0, head, h, t);
    };

    ab_load_tile<BK, D, THREADS>(ks, k, b, k0, kvh, g, t);
    ab_load_tile<BK, D, THREADS>(vs, v, b, k0, kvh, g, t);
    stage(it_first);
    ab_cp_commit();

    float dka[ND][4], dva[ND][4];
#pragma unroll
    for (int n = 0; n < ND; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dka[n][e] = dva[n][e] = 0.0f;

    for (int it = it_first; it < it_end; it++) {
        const int q0 = (qb0 + it / group) * AB_QUERIES, head = kvh * group + it % group;
        const int qlast = min(q0 + AB_QUERIES, t) - 1;  // the last valid query of the tile
        ab_cp_wait_all();
        __syncthreads();  // this iteration's Q, dO and rows are in; the last dQ product is done with dSᵀ, and
                          // every warp with the other stage, which the next iteration's loads take
        if (it + 1 < it_end) {
            stage(it + 1);
            ab_cp_commit();
        }
        const bf16_t* qt = qs + (it & 1) * AB_QUERIES * SD;
        const bf16_t* dot = dos + (it & 1) * AB_QUERIES * SD;
        const float* rows = rows_s + (it & 1) * 2 * AB_QUERIES;
        if (kw <= qlast) {  // else every query of the tile is before every key of this warp
            // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for this warp's 16 keys and the 64 queries.
            float s[8][4], dp[8][4];
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) s[n][e] = dp[n][e] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KD; kk++) {
                unsigned ka[4], va[4];
                const int a_off = (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SD + kk * 16 + (lane >> 4) * 8;
                ab_ldsm(ka, ks + a_off);
                ab_ldsm(va, vs + a_off);
#pragma unroll
                for (int np = 0; np < 4; np++) {
                    const int b_off = (np * 16 + (lane & 7) + (lane >> 4) * 8) * SD + kk * 16 + ((lane >> 3) & 1) * 8;
                    unsigned f[4];
                    ab_ldsm(f, qt + b_off);
                    ab_mma(s[2 * np], ka, f[0], f[1]);
                    ab_mma(s[2 * np + 1], ka, f[2], f[3]);
                    ab_ldsm(f, dot + b_off);
                    ab_mma(dp[2 * np], va, f[0], f[1]);
                    ab_mma(dp[2 * np + 1], va, f[2], f[3]);
                }
            }
            // Pᵀ (0 where the key is after the query or the query is past T) and dSᵀ = Pᵀ∘(dPᵀ − delta); queries
            // q0 + 8n + 2ti + (e & 1) are this thread's columns. Only tiles with a query before one of the
            // warp's keys, or past T, need the mask.
#pragma unroll
            for (int n = 0; n < 8; n++) {
                const float2 l2 = *reinterpret_cast<const float2*>(rows + n * 8 + 2 * ti);
#pragma unroll
                for (int e = 0; e < 4; e++) s[n][e] = ab_exp2(fmaf(s[n][e], c, -((e & 1) ? l2.y : l2.x) * AB_LOG2E));
            }
            // The mask, a branch of its own (a select inside the loops would cost every tile its compares).
            if (q0 < kw + 15 || q0 + AB_QUERIES > t) {
#pragma unroll
                for (int n = 0; n < 8; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int qq = q0 + n * 8 + 2 * ti + (e & 1), key = key0 + (e >> 1) * 8;
                        if (qq >= t || key > qq) s[n][e] = 0.0f;
                    }
            }
#pragma unroll
            for (int n = 0; n < 8; n++) {
                const float2 dl = *reinterpret_cast<const float2*>(rows + AB_QUERIES + n * 8 + 2 * ti);
#pragma unroll
                for (int e = 0; e < 4; e++) dp[n][e] = s[n][e] * (dp[n][e] - ((e & 1) ? dl.y : dl.x));
            }
            // dV += Pᵀ·dO and dK += dSᵀ·Q; dSᵀ also goes to shared memory for the dQ product.
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                unsigned pa[4], da[4];
                ab_c_to_a(pa, s[2 * kk], s[2 * kk + 1]);
                ab_c_to_a(da, dp[2 * kk], dp[2 * kk + 1]);
                bf16_t* ds_row = dss + (warp * 16 + gi) * SQ + kk * 16 + 2 * ti;
                *reinterpret_cast<unsigned*>(ds_row) = da[0];
                *reinterpret_cast<unsigned*>(ds_row + 8 * SQ) = da[1];
                *reinterpret_cast<unsigned*>(ds_row + 8) = da[2];
                *reinterpret_cast<unsigned*>(ds_row + 8 * SQ + 8) = da[3];
#pragma unroll
                for (int dd = 0; dd < D / 16; dd++) {
                    const int off = (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SD + dd * 16 + (lane >> 4) * 8;
                    unsigned f[4];
                    ab_ldsm_t(f, dot + off);
                    ab_mma(dva[2 * dd], pa, f[0], f[1]);
                    ab_mma(dva[2 * dd + 1], pa, f[2], f[3]);
                    ab_ldsm_t(f, qt + off);
                    ab_mma(dka[2 * dd], da, f[0], f[1]);
                    ab_mma(dka[2 * dd + 1], da, f[2], f[3]);
                }
            }
        }
        if (!dq) continue;
        __syncthreads();  // dSᵀ is complete
        // dQ rows q0 + 16 (warp % 4) + gi (+8) = scale·dS·K over the keys of the warps that ran above; dS = (dSᵀ)ᵀ
        // via ldmatrix.trans, K [key][d] as the col-major B via ldmatrix.trans.
        const int qr = (warp % 4) * 16;
#pragma unroll
        for (int dc = 0; dc < DQ / DC; dc++) {
            const int col0 = (warp / 4) * DQ + dc * DC;
            float acc[DC / 8][4];
#pragma unroll
            for (int n = 0; n < DC / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < W; kk++) {
                if (k0 + kk * 16 > qlast) break;  // warp kk's keys: every one after every query
                unsigned a[4];
                ab_ldsm_t(a, dss + (kk * 16 + (lane & 7) + (lane >> 4) * 8) * SQ + qr + ((lane >> 3) & 1) * 8);
#pragma unroll
                for (int np = 0; np < DC / 16; np++) {
                    unsigned f[4];
                    ab_ldsm_t(f, ks + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SD + col0 + np * 16 +
                                     (lane >> 4) * 8);
                    ab_mma(acc[2 * np], a, f[0], f[1]);
                    ab_mma(acc[2 * np + 1], a, f[2], f[3]);
                }
            }
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int row = q0 + qr + gi + r * 8;
                if (row >= t) continue;
                float* dst = dq + (((i64)b * t + row) * h + head) * D + col0 + 2 * ti;
#pragma unroll
                for (int n = 0; n < DC / 8; n++)
                    ab_atomic_add2(dst + n * 8, acc[n][2 * r] * scale, acc[n][2 * r + 1] * scale);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int key = key0 + r * 8;
        if (key >= t) continue;
        const i64 at = (((i64)b * t + key) * g + kvh) * D + 2 * ti;
#pragma unroll
        for (int n = 0; n < ND; n++) {
            if (splits > 1) {
                if (dk) ab_atomic_add2(dk + at + n * 8, dka[n][2 * r] * scale, dka[n][2 * r + 1] * scale);
                if (dv) ab_atomic_add2(dv + at + n * 8, dva[n][2 * r], dva[n][2 * r + 1]);
                continue;
            }
            if (dk || dk_b) ab_store_o(dk, dk_b, at + n * 8, dka[n][2 * r] * scale, dka[n][2 * r + 1] * scale);
            if (dv || dv_b) ab_store_o(dv, dv_b, at + n * 8, dva[n][2 * r], dva[n][2 * r + 1]);
        }
    }
}

#define AB_BWD(D, W)                                                                                                \
    extern "C" __global__ void __launch_bounds__(32 * W) attention_bwd_bf16_d##D##_w##W(                           \
        float* dq, float* dk, float* dv, bf16_t* dk_b, bf16_t* dv_b, const bf16_t* dout, const bf16_t* q,         \
        const bf16_t* k, const bf16_t* v,                                                                          \
        const float* lse, const float* delta, int nb, int t, int h, int g, float scale, int splits) {              \
        attention_bwd_bf16<D, W>(dq, dk, dv, dk_b, dv_b, dout, q, k, v, lse, delta, nb, t, h, g, scale, splits);     \
    }
AB_BWD(64, 4)
AB_BWD(64, 8)
AB_BWD(128, 4)
AB_BWD(128, 8)
