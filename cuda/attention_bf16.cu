// attention_bf16: the tensor-core twin of cuda/attention.cu for the bf16 mode (src/ops/attention/cuda_bf16.rs),
// head dims 64 and 128. Same tensors and layouts (q [B, T, H, D], k and v [B, T, G, D], out [B, T, H, D] f32,
// lse [B, H, T] natural log), but q, k, v and dO arrive as bf16 copies (the launcher casts them) and every product
// is mma.sync m16n8k16 bf16 x bf16 -> f32. FlashAttention-2's schedule.
//
// mma.sync m16n8k16 fragments (lane = 4·gi + ti): A 16x16 row-major, a0 (row gi, cols 2ti, 2ti+1), a1 (row gi+8),
// a2 (row gi, cols 2ti+8, +9), a3 (row gi+8, cols 2ti+8, +9); B 16x8, b0 (k 2ti, 2ti+1, col gi), b1 (k 2ti+8, +9);
// C 16x8 f32, c0 c1 (row gi, cols 2ti, 2ti+1), c2 c3 (row gi+8). Two adjacent C tiles of one 16-row strip are,
// packed to bf16 pairs, exactly an A fragment over their 16 columns: P and dS never leave registers on the way to
// the next product. ldmatrix.x4 gives a thread row (lane / 4) elements 2·(lane % 4), +1 of four 8x8 matrices whose
// row addresses lanes 0-7, 8-15, 16-23, 24-31 supply; .trans gives the transpose. Shared-memory rows are padded by 8
// bf16 (16 bytes), so the 8 rows of one 8x8 matrix fall in distinct banks.
//
// Forward: one block of 4 warps per (64-query block, batch, query head); warp w owns query rows 16w..16w+15, keeps
// its Q fragments in registers, and runs the online softmax over 64-key tiles 0..q block (the causal mask only in
// the diagonal tile) in the log2 domain (exp2 of scores times scale·log2 e). K/V tiles are double-buffered with
// cp.async: tile j + 1 loads while tile j is multiplied.
// Backward: attention_prep_bwd_bf16 rounds dO to bf16 and computes delta = rowsum(dO∘O) from that rounded dO, the
// one the products see (so that at T = 1, where dS = P∘(dP − delta) is 0 exactly, dP and delta agree up to f32
// rounding). One block of 4 warps
// per (64-key block, batch, key/value head); warp w owns keys 16w..16w+15 and accumulates their dK and dV in
// registers over every query block at or after the key block and every query head of the group (so dK and dV are
// written once, `=`, already summed over the group). Per query block: Sᵀ = K·Qᵀ, Pᵀ = exp2(Sᵀ·c − lse·log2 e),
// dPᵀ = V·dOᵀ, dSᵀ = Pᵀ∘(dPᵀ − delta); dV += Pᵀ·dO, dK += dSᵀ·Q; dSᵀ goes to shared memory and the block adds
// its share of dQ = scale·dS·K into dq with f32 atomics, two floats per instruction on sm_90 (dq must start
// zeroed; the order of the adds, and so the
// low bits of dq, vary from run to run). The next query block's Q and dO load during the dQ product.

#define AB_KEYS 64     // keys per forward K/V tile
#define AB_QUERIES 64  // queries per backward Q/dO tile
#define AB_NEG_INF (-__int_as_float(0x7f800000))
#define AB_LOG2E 1.4426950408889634f
#define AB_LN2 0.6931471805599453f

typedef unsigned short bf16_t;

__device__ __forceinline__ unsigned ab_smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// 16 bytes global -> shared, asynchronously; with `valid` false the 16 bytes are zero-filled and nothing is read.
__device__ __forceinline__ void ab_cp16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(ab_smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
// 4 bytes global -> shared, asynchronously (zero-filled when `valid` is false).
__device__ __forceinline__ void ab_cp4(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(ab_smem_addr(dst)), "l"(src),
                 "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void ab_cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void ab_cp_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void ab_ldsm(unsigned (&r)[4], const bf16_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(ab_smem_addr(p)));
}
__device__ __forceinline__ void ab_ldsm_t(unsigned (&r)[4], const bf16_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(ab_smem_addr(p)));
}

// c += a · b (16x16 by 16x8, bf16 in, f32 accumulate).
__device__ __forceinline__ void ab_mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as a bf16 pair (round to nearest even), lo in the low half.
__device__ __forceinline__ unsigned ab_pack(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float ab_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// p[0] += a, p[1] += b (p 8-byte aligned), atomically.
__device__ __forceinline__ void ab_atomic_add2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

// The A fragments of a 16-row strip over 16 columns from two adjacent C tiles (columns 16kk..16kk+15).
__device__ __forceinline__ void ab_c_to_a(unsigned (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
    a[0] = ab_pack(c0[0], c0[1]);
    a[1] = ab_pack(c0[2], c0[3]);
    a[2] = ab_pack(c1[0], c1[1]);
    a[3] = ab_pack(c1[2], c1[3]);
}

// Starts copying rows [t0, t0 + ROWS) of head `head` of batch b of a bf16 [B, T, heads, D] tensor into a
// [ROWS][D + 8] tile, THREADS threads sharing the 16-byte chunks; rows at or past T are zero-filled.
template <int ROWS, int D, int THREADS>
__device__ __forceinline__ void ab_load_tile(bf16_t* tile, const bf16_t* src, int b, int t0, int head, int heads,
                                             int t) {
    constexpr int CHUNKS = D / 8, SD = D + 8;  // 16-byte chunks per row
#pragma unroll
    for (int i = threadIdx.x; i < ROWS * CHUNKS; i += THREADS) {
        const int r = i / CHUNKS, c = (i % CHUNKS) * 8, row = t0 + r;
        const bool valid = row < t;
        const bf16_t* p = src + (((i64)b * t + (valid ? row : 0)) * heads + head) * D + c;
        ab_cp16(tile + r * SD + c, p, valid);
    }
}

// Forward. Grid: ceil(T / (64·MT)) * B * H blocks of 128 threads (4 warps of 16·MT query rows); dynamic shared
// memory (64·MT + 4·64) * (D + 8) bf16 (Q, two K and two V tiles).
template <int D, int MT>
__device__ void attention_fwd_bf16(float* out, float* lse, const bf16_t* q, const bf16_t* k, const bf16_t* v, int nb,
                                   int t, int h, int g, float scale) {
    constexpr int SD = D + 8, KD = D / 16, ND = D / 8, WR = 16 * MT, BM = 4 * WR;
    extern __shared__ uint4 ab_smem[];
    bf16_t* qs = reinterpret_cast<bf16_t*>(ab_smem);  // [BM][SD]
    bf16_t* ks = qs + BM * SD;                         // [2][64][SD]
    bf16_t* vs = ks + 2 * AB_KEYS * SD;                // [2][64][SD]
    const int nqb = (t + BM - 1) / BM;
    const int bh = blockIdx.x % (nb * h);
    const int qb = nqb - 1 - blockIdx.x / (nb * h);  // the longest rows start first
    const int b = bh / h, head = bh % h, kvh = head / (h / g), q0 = qb * BM;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gi = lane / 4, ti = lane % 4;
    const int wrow = q0 + warp * WR;  // this warp's first row; the thread's rows are wrow + 16 mt + 8 r + gi
    const int tiles = min(q0 + BM, t) / AB_KEYS + (min(q0 + BM, t) % AB_KEYS != 0);  // key tiles up to the last row
    const float c = scale * AB_LOG2E;

    ab_load_tile<BM, D, 128>(qs, q, b, q0, head, h, t);
    ab_load_tile<AB_KEYS, D, 128>(ks, k, b, 0, kvh, g, t);
    ab_load_tile<AB_KEYS, D, 128>(vs, v, b, 0, kvh, g, t);
    ab_cp_commit();

    float o[MT][ND][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int n = 0; n < ND; n++) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
    // Per row (2 mt + r): m the running maximum of the raw scores, l this thread's share of the row sum.
    float m[2 * MT], l[2 * MT];
#pragma unroll
    for (int r = 0; r < 2 * MT; r++) m[r] = AB_NEG_INF, l[r] = 0.0f;

    for (int j = 0; j < tiles; j++) {
        ab_cp_wait_all();
        __syncthreads();  // tile j is in; every warp is done with tile j - 1, whose buffers tile j + 1 takes
        if (j + 1 < tiles) {
            const int nxt = (j + 1) & 1;
            ab_load_tile<AB_KEYS, D, 128>(ks + nxt * AB_KEYS * SD, k, b, (j + 1) * AB_KEYS, kvh, g, t);
            ab_load_tile<AB_KEYS, D, 128>(vs + nxt * AB_KEYS * SD, v, b, (j + 1) * AB_KEYS, kvh, g, t);
            ab_cp_commit();
        }
        const int k0 = j * AB_KEYS;
        if (k0 > wrow + WR - 1) continue;  // every key of the tile is after every row of this warp
        const bf16_t* kt = ks + (j & 1) * AB_KEYS * SD;
        const bf16_t* vt = vs + (j & 1) * AB_KEYS * SD;
        // S = Q·Kᵀ: each K fragment feeds the MT row strips.
        float s[MT][8][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int n = 0; n < 8; n++) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KD; kk++) {
            unsigned qf[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
                ab_ldsm(qf[mt], qs + (warp * WR + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SD + kk * 16 +
                                    (lane >> 4) * 8);
#pragma unroll
            for (int np = 0; np < 4; np++) {
                unsigned f[4];
                ab_ldsm(f, kt + (np * 16 + (lane & 7) + (lane >> 4) * 8) * SD + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    ab_mma(s[mt][2 * np], qf[mt], f[0], f[1]);
                    ab_mma(s[mt][2 * np + 1], qf[mt], f[2], f[3]);
                }
            }
        }
        // Keys k0 + 8n + 2ti + (e & 1) for rows wrow + 16mt + 8(e >> 1) + gi; only tiles reaching past the warp's
        // first row or past T hold masked keys.
        const bool edge = k0 + AB_KEYS - 1 > wrow || k0 + AB_KEYS > t;
        float mx[2 * MT];
#pragma unroll
        for (int r = 0; r < 2 * MT; r++) mx[r] = AB_NEG_INF;
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    if (edge) {
                        const int key = k0 + n * 8 + 2 * ti + (e & 1), row = wrow + mt * 16 + (e >> 1) * 8 + gi;
                        if (key > row || key >= t) s[mt][n][e] = AB_NEG_INF;
                    }
                    mx[2 * mt + (e >> 1)] = fmaxf(mx[2 * mt + (e >> 1)], s[mt][n][e]);
                }
        float corr[2 * MT], mc[2 * MT];
#pragma unroll
        for (int r = 0; r < 2 * MT; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float m_new = fmaxf(m[r], mx[r]);
            // Every row meets key 0 in tile 0, so m_new is finite; the guard keeps a row with no valid key at 0
            // rather than NaN.
            mc[r] = m_new == AB_NEG_INF ? 0.0f : m_new * c;
            corr[r] = ab_exp2(fmaf(m[r], c, -mc[r]));  // 0 on the first tile (m = -inf)
            m[r] = m_new;
            l[r] *= corr[r];
        }
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int r = 2 * mt + (e >> 1);
                    const float p = ab_exp2(fmaf(s[mt][n][e], c, -mc[r]));
                    s[mt][n][e] = p;
                    l[r] += p;
                }
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int n = 0; n < ND; n++) {
                o[mt][n][0] *= corr[2 * mt];
                o[mt][n][1] *= corr[2 * mt];
                o[mt][n][2] *= corr[2 * mt + 1];
                o[mt][n][3] *= corr[2 * mt + 1];
            }
        // O += P·V: P's A fragments straight from the score registers, each V fragment (ldmatrix.trans) feeding
        // the MT row strips.
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            unsigned pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) ab_c_to_a(pa[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
#pragma unroll
            for (int dp = 0; dp < D / 16; dp++) {
                unsigned f[4];
                ab_ldsm_t(f, vt + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SD + dp * 16 + (lane >> 4) * 8);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    ab_mma(o[mt][2 * dp], pa[mt], f[0], f[1]);
                    ab_mma(o[mt][2 * dp + 1], pa[mt], f[2], f[3]);
                }
            }
        }
    }
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float& lr = l[2 * mt + r];
            lr += __shfl_xor_sync(0xffffffffu, lr, 1);
            lr += __shfl_xor_sync(0xffffffffu, lr, 2);
            const int row = wrow + mt * 16 + r * 8 + gi;
            if (row >= t) continue;
            const float inv = 1.0f / lr;
            float* dst = out + (((i64)b * t + row) * h + head) * D + 2 * ti;
#pragma unroll
            for (int n = 0; n < ND; n++)
                *reinterpret_cast<float2*>(dst + n * 8) =
                    make_float2(o[mt][n][2 * r] * inv, o[mt][n][2 * r + 1] * inv);
            if (ti == 0) lse[((i64)b * h + head) * t + row] = (m[2 * mt + r] * c + log2f(lr)) * AB_LN2;
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

// Backward. Grid: ceil(T / (16·W)) * B * G blocks of 32·W threads (W warps of 16 keys); dynamic shared memory
// (16·W + 4·64) * (D + 8) + 16·W * 72 bf16 (K, V, two Q and two dO tiles, dSᵀ) and 256 floats (two lse and delta
// stages). dq must be zeroed (or null); dk, dv [B, T, G, D] are written (each may be null).
template <int D, int W>
__device__ void attention_bwd_bf16(float* dq, float* dk, float* dv, const bf16_t* dout, const bf16_t* q,
                                   const bf16_t* k, const bf16_t* v, const float* lse, const float* delta, int nb,
                                   int t, int h, int g, float scale) {
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
    const int kb = blockIdx.x / (nb * g);  // key block 0 meets every query block: it starts first
    const int b = bg / g, kvh = bg % g, k0 = kb * BK;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gi = lane / 4, ti = lane % 4;
    const int kw = k0 + warp * 16, key0 = kw + gi;  // the warp's first key; this thread's keys key0, key0 + 8
    const float c = scale * AB_LOG2E;
    const int qb0 = k0 / AB_QUERIES;            // the first query block at or after a key of the block
    const int iters = (nqb - qb0) * group;      // (query block, query head of the group) pairs
    auto stage = [&](int it) {
        const int q0 = (qb0 + it / group) * AB_QUERIES, head = kvh * group + it % group, buf = it & 1;
        ab_load_tile<AB_QUERIES, D, THREADS>(qs + buf * AB_QUERIES * SD, q, b, q0, head, h, t);
        ab_load_tile<AB_QUERIES, D, THREADS>(dos + buf * AB_QUERIES * SD, dout, b, q0, head, h, t);
        ab_stage_rows(rows_s + buf * 2 * AB_QUERIES, lse, delta, b, q0, head, h, t);
    };

    ab_load_tile<BK, D, THREADS>(ks, k, b, k0, kvh, g, t);
    ab_load_tile<BK, D, THREADS>(vs, v, b, k0, kvh, g, t);
    stage(0);
    ab_cp_commit();

    float dka[ND][4], dva[ND][4];
#pragma unroll
    for (int n = 0; n < ND; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dka[n][e] = dva[n][e] = 0.0f;

    for (int it = 0; it < iters; it++) {
        const int q0 = (qb0 + it / group) * AB_QUERIES, head = kvh * group + it % group;
        const int qlast = min(q0 + AB_QUERIES, t) - 1;  // the last valid query of the tile
        ab_cp_wait_all();
        __syncthreads();  // this iteration's Q, dO and rows are in; the last dQ product is done with dSᵀ, and
                          // every warp with the other stage, which the next iteration's loads take
        if (it + 1 < iters) {
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
            const bool edge = q0 < kw + 15 || q0 + AB_QUERIES > t;
#pragma unroll
            for (int n = 0; n < 8; n++) {
                const float2 l2 = *reinterpret_cast<const float2*>(rows + n * 8 + 2 * ti);
                const float2 dl = *reinterpret_cast<const float2*>(rows + AB_QUERIES + n * 8 + 2 * ti);
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int qq = q0 + n * 8 + 2 * ti + (e & 1), key = key0 + (e >> 1) * 8;
                    float p = ab_exp2(fmaf(s[n][e], c, -((e & 1) ? l2.y : l2.x) * AB_LOG2E));
                    if (edge && (qq >= t || key > qq)) p = 0.0f;
                    s[n][e] = p;
                    dp[n][e] = p * (dp[n][e] - ((e & 1) ? dl.y : dl.x));
                }
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
            if (dk) *reinterpret_cast<float2*>(dk + at + n * 8) = make_float2(dka[n][2 * r] * scale, dka[n][2 * r + 1] * scale);
            if (dv) *reinterpret_cast<float2*>(dv + at + n * 8) = make_float2(dva[n][2 * r], dva[n][2 * r + 1]);
        }
    }
}

#define AB_FWD(D, MT)                                                                                               \
    extern "C" __global__ void __launch_bounds__(128) attention_fwd_bf16_d##D##_m##MT(                             \
        float* out, float* lse, const bf16_t* q, const bf16_t* k, const bf16_t* v, int nb, int t, int h, int g,    \
        float scale) {                                                                                              \
        attention_fwd_bf16<D, MT>(out, lse, q, k, v, nb, t, h, g, scale);                                          \
    }
AB_FWD(64, 2)
AB_FWD(128, 2)

#define AB_BWD(D, W)                                                                                                \
    extern "C" __global__ void __launch_bounds__(32 * W) attention_bwd_bf16_d##D##_w##W(                           \
        float* dq, float* dk, float* dv, const bf16_t* dout, const bf16_t* q, const bf16_t* k, const bf16_t* v,    \
        const float* lse, const float* delta, int nb, int t, int h, int g, float scale) {                          \
        attention_bwd_bf16<D, W>(dq, dk, dv, dout, q, k, v, lse, delta, nb, t, h, g, scale);                       \
    }
AB_BWD(64, 4)
AB_BWD(64, 8)
AB_BWD(128, 4)
AB_BWD(128, 8)

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
