#line 1 "cuda/attention_bf16_sm90.cu"
// The Hopper (sm_90a) kernels of the bf16 attention, appended to cuda/attention_bf16.cu (whose helpers they use)
// by src/ops/attention/cuda_bf16.rs; the schedule is described in that file's header. Compiled only for sm_90a.
#ifdef __CUDA_ARCH_FEAT_SM90_ALL

__device__ __forceinline__ void ab_wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void ab_wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void ab_wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Waits until at most one committed group (the last) is still running.
__device__ __forceinline__ void ab_wgmma_wait_1() { asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory"); }
// Generic-proxy writes to shared memory (cp.async, st.shared) made visible to wgmma's reads (async proxy); a
// barrier must follow.
__device__ __forceinline__ void ab_fence_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving accumulator registers across the asynchronous wgmma (no code).
template <int N>
__device__ __forceinline__ void ab_reg_fence(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}

// d (m64n64 f32 accumulator fragments) = A·B (+ d when `accumulate`), A and B in shared memory, K-major
// unless TA / TB (then M-major A, N-major B).
template <int TA, int TB>
__device__ __forceinline__ void ab_wgmma_ss_n64(float (&d)[32], unsigned long long a, unsigned long long b,
                                                int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, %32, %33, p, 1, 1, %35, %36;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(a), "l"(b), "r"(accumulate), "n"(TA), "n"(TB));
}

// d (m64n128 f32 accumulator fragments) += A·B, A in registers (per warp the mma.sync A fragment layout of
// its 16 rows), B N-major in shared memory.
__device__ __forceinline__ void ab_wgmma_rs_n128(float (&d)[64], const unsigned (&a)[4], unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

// dst[0 .. bytes / 4) += src[...] in f32, by the TMA unit (a bulk reduction into global memory, L2 doing the
// adds); src in shared memory and dst 16-byte aligned, bytes a multiple of 16. Tracked by the issuing thread's
// bulk groups.
__device__ __forceinline__ void ab_bulk_add_f32(float* dst, const float* src, unsigned bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst),
                 "r"(ab_smem_addr(src)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void ab_bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// The thread's bulk copies have read their shared-memory sources (which may then be written again).
__device__ __forceinline__ void ab_bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
// The thread's bulk copies are complete.
__device__ __forceinline__ void ab_bulk_wait() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }

// A shared-memory matrix descriptor: 128-byte swizzle, leading and stride byte offsets.
__device__ __forceinline__ unsigned long long ab_desc(const void* p, unsigned lbo, unsigned sbo) {
    return (unsigned long long)((ab_smem_addr(p) & 0x3FFFF) >> 4) | ((unsigned long long)(lbo >> 4) << 16) |
           ((unsigned long long)(sbo >> 4) << 32) | (1ull << 62);
}

// The descriptor of `bytes` (a multiple of 16) past d's start: the address field holds the shared-memory offset
// / 16 in 14 bits, and shared memory ends below 256 KiB, so adding never carries out of it. Descriptors are made
// once per kernel and moved by constants in the loops (no per-product address arithmetic).
__device__ __forceinline__ unsigned long long ab_desc_at(unsigned long long d, unsigned bytes) { return d + (bytes >> 4); }

// Starts copying rows [t0, t0 + ROWS) of head `head` of a bf16 [B, T, heads, D] tensor into the 128-byte-swizzled
// tile layout wgmma reads: D / 64 sub-tiles of [ROWS][64] bf16, each row 128 bytes whose 16-byte chunk c sits at
// chunk c ^ (row % 8) (the tile 1024-byte aligned). Rows at or past T are zero-filled.
template <int ROWS, int D, int THREADS>
__device__ __forceinline__ void ab_load_tile_sw(unsigned char* tile, const bf16_t* src, int b, int t0, int head,
                                                int heads, int t) {
    using Tc = TileChunks<ROWS, D, THREADS>;
    static_assert(Tc::STEP % 8 == 0, "a thread's rows share their swizzle (row % 8)");
    const Tc tc(src, b, t0, head, heads, t);
    unsigned char* dst = tile + (tc.c / 8) * ROWS * 128 + tc.r0 * 128 + (((tc.c % 8) ^ (tc.r0 % 8)) * 16);
#pragma unroll
    for (int k = 0; k < Tc::PER_THREAD; k++) {
        const bool valid = t0 + tc.r0 + k * Tc::STEP < t;
        ab_cp16(dst + k * Tc::STEP * 128, tc.src(src, k, valid), valid);
    }
}

// Forward on wgmma, D 128. Grid: ceil(T / 128) * B * H blocks of 256 threads (2 warpgroups of 64 query rows);
// dynamic shared memory 1024 + (128 + 4·64) · 256 bytes (Q, two stages of K and V, swizzled; 1 KiB for the
// alignment). At most 128 registers, so that two blocks share an SM.
__device__ void attention_fwd_wg(float* out, bf16_t* out_b, float* lse, const bf16_t* q, const bf16_t* k, const bf16_t* v, int nb,
                                 int t, int h, int g, float scale) {
    constexpr int D = 128, BN = AB_KEYS, BM = 128, ND = D / 8, NS = BN / 8, TILE_KV = BN * D * 2;
    extern __shared__ uint4 ab_smem[];
    unsigned char* base = reinterpret_cast<unsigned char*>(ab_smem);
    base += (1024 - (ab_smem_addr(base) & 1023)) & 1023;  // the swizzle pattern repeats every 1024 bytes
    unsigned char* qs = base;                  // [D/64][BM][128 B]
    unsigned char* ks = qs + BM * D * 2;       // [2][D/64][BN][128 B]
    unsigned char* vs = ks + 2 * TILE_KV;      // [2][D/64][BN][128 B]
    const int nqb = (t + BM - 1) / BM;
    const int bh = blockIdx.x % (nb * h);
    const int qb = nqb - 1 - blockIdx.x / (nb * h);  // the longest rows start first
    const int b = bh / h, head = bh % h, kvh = head / (h / g), q0 = qb * BM;
    const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, gi = lane / 4,
              ti = lane % 4;
    const int wgrow = q0 + wg * 64, row0 = wgrow + warp * 16 + gi;  // this thread's rows: row0 and row0 + 8
    const int last = min(q0 + BM, t);
    const int tiles = (last + BN - 1) / BN;  // key tiles up to the block's last row
    const float c = scale * AB_LOG2E;

    ab_load_tile_sw<BM, D, 256>(qs, q, b, q0, head, h, t);
    ab_load_tile_sw<BN, D, 256>(ks, k, b, 0, kvh, g, t);
    ab_load_tile_sw<BN, D, 256>(vs, v, b, 0, kvh, g, t);
    ab_cp_commit();

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; i++) o[i] = 0.0f;
    float m[2] = {AB_NEG_INF, AB_NEG_INF}, l[2] = {0.0f, 0.0f};
    const unsigned long long qd = ab_desc(qs + wg * 64 * 128, 16, 1024), kd0 = ab_desc(ks, 16, 1024),
                             vd0 = ab_desc(vs, BN * 128, 1024);

    for (int j = 0; j < tiles; j++) {
        ab_cp_wait_all();
        ab_fence_async();
        __syncthreads();  // tile j is in; every warpgroup is done with tile j - 1, whose buffers tile j + 1 takes
        if (j + 1 < tiles) {
            const int nxt = (j + 1) & 1;
            ab_load_tile_sw<BN, D, 256>(ks + nxt * TILE_KV, k, b, (j + 1) * BN, kvh, g, t);
            ab_load_tile_sw<BN, D, 256>(vs + nxt * TILE_KV, v, b, (j + 1) * BN, kvh, g, t);
            ab_cp_commit();
        }
        const int k0 = j * BN;
        if (k0 > wgrow + 63) continue;  // every key of the tile is after every row of this warpgroup
        const unsigned long long kd = ab_desc_at(kd0, (j & 1) * TILE_KV), vd = ab_desc_at(vd0, (j & 1) * TILE_KV);
        // S = Q·Kᵀ: k-step ks reads 32 bytes of the 128-byte rows of sub-tile ks / 4.
        float s[BN / 2];
        ab_wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++)
            ab_wgmma_ss_n64<0, 0>(s, ab_desc_at(qd, (kk / 4) * BM * 128 + (kk % 4) * 32),
                                  ab_desc_at(kd, (kk / 4) * BN * 128 + (kk % 4) * 32), kk > 0);
        ab_wgmma_commit();
        ab_wgmma_wait_all();
        ab_reg_fence(s);
        // Keys k0 + 8n + 2ti + (e & 1) for rows row0 + 8 (e >> 1).
        // The mask in a branch of its own: only tiles on the diagonal or past T take it (as a select inside the
        // max loop it would cost every tile its compares).
        if (k0 + BN - 1 > wgrow || k0 + BN > t) {
#pragma unroll
            for (int n = 0; n < NS; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int key = k0 + n * 8 + 2 * ti + (e & 1), row = row0 + (e >> 1) * 8;
                    if (key > row || key >= t) s[4 * n + e] = AB_NEG_INF;
                }
        }
        float mx[2] = {AB_NEG_INF, AB_NEG_INF};
#pragma unroll
        for (int n = 0; n < NS; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) mx[e >> 1] = fmaxf(mx[e >> 1], s[4 * n + e]);
        float corr[2], mc[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float m_new = fmaxf(m[r], mx[r]);
            mc[r] = m_new == AB_NEG_INF ? 0.0f : m_new * c;
            // An unchanged maximum rescales by exactly 1 (the fma would leave m·c's rounding error in the power).
            corr[r] = m_new == m[r] ? 1.0f : ab_exp2(fmaf(m[r], c, -mc[r]));
            m[r] = m_new;
            l[r] *= corr[r];
        }
        unsigned pa[BN / 16][4];
#pragma unroll
        for (int n = 0; n < NS; n++) {
            float p[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                p[e] = ab_exp2(fmaf(s[4 * n + e], c, -mc[e >> 1]));
                l[e >> 1] += p[e];
            }
            pa[n / 2][(n % 2) * 2] = ab_pack(p[0], p[1]);
            pa[n / 2][(n % 2) * 2 + 1] = ab_pack(p[2], p[3]);
        }
        // Past the first tiles a row's maximum rarely moves: a warp whose rows all kept theirs skips the rescale.
        if (__any_sync(0xffffffffu, corr[0] != 1.0f || corr[1] != 1.0f)) {
#pragma unroll
            for (int n = 0; n < ND; n++) {
                o[4 * n] *= corr[0];
                o[4 * n + 1] *= corr[0];
                o[4 * n + 2] *= corr[1];
                o[4 * n + 3] *= corr[1];
            }
        }
        // O += P·V: V [key][d] is MN-major B; k-step kk takes keys 16kk.. (2048 bytes into each sub-tile), the
        // sub-tiles of 64 head-dim columns BN·128 bytes apart.
        ab_wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++)
            ab_wgmma_rs_n128(o, pa[kk], ab_desc_at(vd, kk * 2048));
        ab_wgmma_commit();
        ab_wgmma_wait_all();
        ab_reg_fence(o);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        const int row = row0 + r * 8;
        if (row >= t) continue;
        const float inv = 1.0f / l[r];
        const i64 at = (((i64)b * t + row) * h + head) * D + 2 * ti;
#pragma unroll
        for (int n = 0; n < ND; n++)
            ab_store_o(out, out_b, at + n * 8, o[4 * n + 2 * r] * inv, o[4 * n + 2 * r + 1] * inv);
        if (ti == 0) lse[((i64)b * h + head) * t + row] = (m[r] * c + log2f(l[r])) * AB_LN2;
    }
}


// Backward on wgmma, D 128. Grid: ceil(T / 128) * B * G blocks of 256 threads (2 warpgroups of 64 keys); dynamic
// shared memory 1024 + 2·128·256 + 4·64·256 + 128·128 bytes (K, V, two stages of Q and dO, dSᵀ), 256 floats (two
// stages of lse and delta) and 8 · 16 · AB_DQ_ROW floats (each warp's rows of dQ on their way out). dq must be
// zeroed (or null); dk, dv [B, T, G, D] are written (each may be null), in f32, or in bf16 into dk_b, dv_b when
// those are given instead.
// A staged dQ row: 64 floats and 8 of padding, so that a warp's 8 rows of one store meet 2 bank wavefronts.
#define AB_DQ_ROW 72
template <bool WITH_DQ>
__device__ void attention_bwd_wg(float* dq, float* dk, float* dv, bf16_t* dk_b, bf16_t* dv_b, const bf16_t* dout, const bf16_t* q, const bf16_t* k,
                                 const bf16_t* v, const float* lse, const float* delta, int nb, int t, int h, int g,
                                 float scale) {
    constexpr int D = 128, BK = 128, BQ = AB_QUERIES, ND = D / 8, TILE_K = BK * D * 2, TILE_Q = BQ * D * 2;
    extern __shared__ uint4 ab_smem[];
    unsigned char* base = reinterpret_cast<unsigned char*>(ab_smem);
    base += (1024 - (ab_smem_addr(base) & 1023)) & 1023;  // the swizzle pattern repeats every 1024 bytes
    unsigned char* ks = base;                 // [D/64][BK][128 B]
    unsigned char* vs = ks + TILE_K;          // [D/64][BK][128 B]
    unsigned char* qs = vs + TILE_K;          // [2][D/64][BQ][128 B]
    unsigned char* dos = qs + 2 * TILE_Q;     // [2][D/64][BQ][128 B]
    unsigned char* dss = dos + 2 * TILE_Q;    // dSᵀ [BK keys][64 queries = 128 B], swizzled
    float* rows_s = reinterpret_cast<float*>(dss + BK * 128);  // [2][lse 64, delta 64]
    float* dq_rows = rows_s + 4 * BQ + (threadIdx.x / 32) * 16 * AB_DQ_ROW;  // this warp's [16][AB_DQ_ROW]
    const int nqb = (t + BQ - 1) / BQ, group = h / g;
    const int bg = blockIdx.x % (nb * g);
    const int kb = blockIdx.x / (nb * g);  // key block 0 meets every query block: it starts first
    const int b = bg / g, kvh = bg % g, k0 = kb * BK;
    const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, gi = lane / 4,
              ti = lane % 4;
    const int kw = k0 + wg * 64, key0 = kw + warp * 16 + gi;  // the warpgroup's first key; this thread's keys
    const float c = scale * AB_LOG2E;
    const int qb0 = k0 / BQ;                // the first query block at or after a key of the block
    const int iters = (nqb - qb0) * group;  // (query block, query head of the group) pairs
    // Query blocks from the last down to the block's first: the key blocks of a (batch, kv head) pair that run at
    // once then read the same Q and dO tiles and add into the same dQ rows, which stay in L2.
    auto q_start = [&](int it) { return (nqb - 1 - it / group) * BQ; };
    auto stage = [&](int it) {
        const int q0 = q_start(it), head = kvh * group + it % group, buf = it & 1;
        ab_load_tile_sw<BQ, D, 256>(qs + buf * TILE_Q, q, b, q0, head, h, t);
        ab_load_tile_sw<BQ, D, 256>(dos + buf * TILE_Q, dout, b, q0, head, h, t);
        ab_stage_rows(rows_s + buf * 2 * BQ, lse, delta, b, q0, head, h, t);
    };

    ab_load_tile_sw<BK, D, 256>(ks, k, b, k0, kvh, g, t);
    ab_load_tile_sw<BK, D, 256>(vs, v, b, k0, kvh, g, t);
    stage(0);
    ab_cp_commit();

    float dka[D / 2], dva[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; i++) dka[i] = dva[i] = 0.0f;
    // K-major views (S, dP, dQ's B), and Q, dO as the N-major B of dK, dV.
    const unsigned long long kd = ab_desc(ks + wg * 64 * 128, 16, 1024), vd = ab_desc(vs + wg * 64 * 128, 16, 1024),
                             qd0 = ab_desc(qs, 16, 1024), dod0 = ab_desc(dos, 16, 1024),
                             qn0 = ab_desc(qs, BQ * 128, 1024), don0 = ab_desc(dos, BQ * 128, 1024),
                             dsd = ab_desc(dss, 16, 1024), kq = ab_desc(ks + wg * BK * 128, 16, 1024);

    for (int it = 0; it < iters; it++) {
        const int q0 = q_start(it), head = kvh * group + it % group;
        const int qlast = min(q0 + BQ, t) - 1;  // the last valid query of the tile
        ab_cp_wait_all();
        ab_fence_async();
        __syncthreads();  // this iteration's Q, dO and rows are in; the last dQ product is done with dSᵀ, and
                          // every product with the other stage, which the next iteration's loads take
        if (it + 1 < iters) {
            stage(it + 1);
            ab_cp_commit();
        }
        const unsigned stage_at = (it & 1) * TILE_Q;
        const float* rows = rows_s + (it & 1) * 2 * BQ;
        // Pᵀ and dSᵀ as A fragments; registers a wgmma reads stay untouched until it is waited for.
        unsigned pa[4][4], da[4][4] = {};
        if (kw <= qlast) {  // else every query of the tile is before every key of this warpgroup
            // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for the warpgroup's 64 keys and the 64 queries (all K-major).
            float s[32], dp[32];
            ab_wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                const unsigned a_off = (kk / 4) * BK * 128 + (kk % 4) * 32;
                const unsigned b_off = stage_at + (kk / 4) * BQ * 128 + (kk % 4) * 32;
                ab_wgmma_ss_n64<0, 0>(s, ab_desc_at(kd, a_off), ab_desc_at(qd0, b_off), kk > 0);
                ab_wgmma_ss_n64<0, 0>(dp, ab_desc_at(vd, a_off), ab_desc_at(dod0, b_off), kk > 0);
            }
            ab_wgmma_commit();
            ab_wgmma_wait_all();
            ab_reg_fence(s);
            ab_reg_fence(dp);
            // Pᵀ (0 where the key is after the query or the query is past T) and dSᵀ = Pᵀ∘(dPᵀ − delta), packed
            // as the A fragments of the next products; queries q0 + 8n + 2ti + (e & 1) are this thread's columns.
            // Pᵀ in place of Sᵀ, then the mask in a branch of its own (tiles on the diagonal or past T only).
#pragma unroll
            for (int n = 0; n < 8; n++) {
                const float2 l2 = *reinterpret_cast<const float2*>(rows + n * 8 + 2 * ti);
#pragma unroll
                for (int e = 0; e < 4; e++)
                    s[4 * n + e] = ab_exp2(fmaf(s[4 * n + e], c, -((e & 1) ? l2.y : l2.x) * AB_LOG2E));
            }
            if (q0 < kw + 63 || q0 + BQ > t) {
#pragma unroll
                for (int n = 0; n < 8; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int qq = q0 + n * 8 + 2 * ti + (e & 1), key = key0 + (e >> 1) * 8;
                        if (qq >= t || key > qq) s[4 * n + e] = 0.0f;
                    }
            }
#pragma unroll
            for (int n = 0; n < 8; n++) {
                const float2 dl = *reinterpret_cast<const float2*>(rows + BQ + n * 8 + 2 * ti);
                float p[4], ds[4];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    p[e] = s[4 * n + e];
                    ds[e] = p[e] * (dp[4 * n + e] - ((e & 1) ? dl.y : dl.x));
                }
                pa[n / 2][(n % 2) * 2] = ab_pack(p[0], p[1]);
                pa[n / 2][(n % 2) * 2 + 1] = ab_pack(p[2], p[3]);
                da[n / 2][(n % 2) * 2] = ab_pack(ds[0], ds[1]);
                da[n / 2][(n % 2) * 2 + 1] = ab_pack(ds[2], ds[3]);
                // dSᵀ rows (keys) 64 wg + 16 warp + gi (+8): 16-byte chunk n of the 128-byte row, swizzled by the
                // row's low 3 bits (= gi).
                unsigned char* row = dss + (wg * 64 + warp * 16 + gi) * 128 + ((n ^ gi) << 4) + 4 * ti;
                *reinterpret_cast<unsigned*>(row) = da[n / 2][(n % 2) * 2];
                *reinterpret_cast<unsigned*>(row + 8 * 128) = da[n / 2][(n % 2) * 2 + 1];
            }
            ab_fence_async();
            // dV += Pᵀ·dO: A from registers, dO [query][d] N-major, 16 queries a step. It runs while the
            // warpgroups meet at the barrier below.
            ab_wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < 4; kk++) ab_wgmma_rs_n128(dva, pa[kk], ab_desc_at(don0, stage_at + kk * 2048));
            ab_wgmma_commit();
        }
        float acc[32];
        if (WITH_DQ) {
            __syncthreads();  // dSᵀ is complete
            // dQ [64 queries][64 wg .. 64 wg + 63] = scale·dS·K over the keys of the warpgroups that ran above: dS
            // from dSᵀ (M-major A), K [key][d] (N-major B, sub-tile wg), 16 keys a step.
            const int steps = k0 + 64 <= qlast ? 8 : 4;
            ab_wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < 8; kk++)
                if (kk < steps)
                    ab_wgmma_ss_n64<1, 1>(acc, ab_desc_at(dsd, kk * 2048), ab_desc_at(kq, kk * 2048), kk > 0);
            ab_wgmma_commit();
        }
        // dK += dSᵀ·Q (Q N-major), committed after dQ: it runs while dQ's atomic adds go out. Issued by every
        // warpgroup (dSᵀ = 0 where it had no keys to do): a wgmma on a divergent path would serialize them all.
        ab_wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) ab_wgmma_rs_n128(dka, da[kk], ab_desc_at(qn0, stage_at + kk * 2048));
        ab_wgmma_commit();
        if (WITH_DQ) {
            ab_wgmma_wait_1();  // dV and dQ are done; dK may still run
            ab_reg_fence(acc);
            // The warp's 16 rows x 64 columns go out through shared memory: lane i < 16 hands row i (256 bytes)
            // to the TMA unit, which adds it into dq in L2 beside the next products (no atomic per element).
            if (lane < 16) ab_bulk_wait_read();  // the last iteration's rows have left
            __syncwarp();
#pragma unroll
            for (int r = 0; r < 2; r++)
#pragma unroll
                for (int n = 0; n < 8; n++)
                    *reinterpret_cast<float2*>(dq_rows + (gi + 8 * r) * AB_DQ_ROW + n * 8 + 2 * ti) =
                        make_float2(acc[4 * n + 2 * r] * scale, acc[4 * n + 2 * r + 1] * scale);
            ab_fence_async();
            __syncwarp();
            if (lane < 16) {
                const int row = q0 + warp * 16 + lane;
                if (row < t)
                    ab_bulk_add_f32(dq + (((i64)b * t + row) * h + head) * D + wg * 64, dq_rows + lane * AB_DQ_ROW,
                                    64 * 4);
                ab_bulk_commit();
            }
        }
        ab_wgmma_wait_all();  // dV and dK are done with this stage before the next iteration reloads it
        ab_reg_fence(dva);
        ab_reg_fence(dka);
    }
    if (WITH_DQ && lane < 16) ab_bulk_wait();  // the rows are in dq before shared memory goes away
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int key = key0 + r * 8;
        if (key >= t) continue;
        const i64 at = (((i64)b * t + key) * g + kvh) * D + 2 * ti;
#pragma unroll
        for (int n = 0; n < ND; n++) {
            if (dk || dk_b)
                ab_store_o(dk, dk_b, at + n * 8, dka[4 * n + 2 * r] * scale, dka[4 * n + 2 * r + 1] * scale);
            if (dv || dv_b) ab_store_o(dv, dv_b, at + n * 8, dva[4 * n + 2 * r], dva[4 * n + 2 * r + 1]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256, 2) attention_fwd_bf16_d128_sm90(
    float* out, bf16_t* out_b, float* lse, const bf16_t* q, const bf16_t* k, const bf16_t* v, int nb, int t, int h,
    int g, float scale) {
    attention_fwd_wg(out, out_b, lse, q, k, v, nb, t, h, g, scale);
}
extern "C" __global__ void __launch_bounds__(256, 1) attention_bwd_bf16_d128_sm90(
    float* dq, float* dk, float* dv, bf16_t* dk_b, bf16_t* dv_b, const bf16_t* dout, const bf16_t* q, const bf16_t* k,
    const bf16_t* v, const float* lse, const float* delta, int nb, int t, int h, int g, float scale) {
    // Without dq the dQ product is compiled out (a run-time test around it would serialize the wgmmas).
    if (dq)
        attention_bwd_wg<true>(dq, dk, dv, dk_b, dv_b, dout, q, k, v, lse, delta, nb, t, h, g, scale);
    else
        attention_bwd_wg<false>(dq, dk, dv, dk_b, dv_b, dout, q, k, v, lse, delta, nb, t, h, g, scale);
}


#endif  // __CUDA_ARCH_FEAT_SM90_ALL
