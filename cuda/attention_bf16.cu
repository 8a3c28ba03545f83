// attention_bf16: the tensor-core twin of cuda/attention.cu for the bf16 mode (src/ops/attention/cuda_bf16.rs),
// head dims 64 and 128. Same tensors and layouts (q [B, T, H, D], k and v [B, T, G, D], out [B, T, H, D] f32,
// lse [B, H, T] natural log), but q, k, v and dO arrive as bf16 copies (the launcher casts them) and every product
// is bf16 x bf16 -> f32 on the tensor cores. FlashAttention-2's algorithm. Three files, concatenated by the
// launcher: this one (helpers, the forward kernels, the backward's prep), attention_bf16_bwd.cu (the mma.sync
// backward) and attention_bf16_sm90.cu (Hopper's wgmma forward and backward for D 128, compiled for sm_90a only).
// Which kernel runs, as measured on an H100 (BENCHMARKS.md): forward D 64 attention_fwd_bf16_d64 everywhere (the
// fastest at SmolLM2's shape, wgmma included); D 128 attention_fwd_bf16_d128_sm90 on Hopper, else
// attention_fwd_bf16_d128. Backward D 128 on Hopper attention_bwd_bf16_d128_sm90, else attention_bwd_bf16_d*_w8
// when ceil(T/128)·B·G blocks fill the SMs, attention_bwd_bf16_d*_w4 (more, shorter blocks) when not.
//
// mma.sync m16n8k16 fragments (lane = 4·gi + ti): A 16x16 row-major, a0 (row gi, cols 2ti, 2ti+1), a1 (row gi+8),
// a2 (row gi, cols 2ti+8, +9), a3 (row gi+8, cols 2ti+8, +9); B 16x8, b0 (k 2ti, 2ti+1, col gi), b1 (k 2ti+8, +9);
// C 16x8 f32, c0 c1 (row gi, cols 2ti, 2ti+1), c2 c3 (row gi+8). Two adjacent C tiles of one 16-row strip are,
// packed to bf16 pairs, exactly an A fragment over their 16 columns: P and dS never leave registers on the way to
// the next product. ldmatrix.x4 gives a thread row (lane / 4) elements 2·(lane % 4), +1 of four 8x8 matrices whose
// row addresses lanes 0-7, 8-15, 16-23, 24-31 supply; .trans gives the transpose. Shared-memory rows are padded by 8
// bf16 (16 bytes), so the 8 rows of one 8x8 matrix fall in distinct banks. wgmma's m64nNk16 accumulators hold, per
// warp of the warpgroup, 16 rows in exactly the C layout above (n-tile j in registers 4j..4j+3), and its A from
// registers takes the A layout above: the softmax and the P/dS packing are the same code for both.
//
// Forward: one block per (query block, batch, query head), query blocks longest first; the online softmax runs
// over 64-key tiles up to the block's last row in the log2 domain (exp2 of scores times scale·log2 e), K/V tiles
// double-buffered with cp.async (tile j + 1 loads while tile j is multiplied), the causal mask only in tiles that
// reach past a warp's first row or past T. D 64: 4 warps of 16 rows, Q fragments kept in registers.
// D 128 (mma.sync): 4 warps of 32 rows (128-row blocks), so that each K and V fragment loaded by ldmatrix feeds two
// MMAs; Q fragments reloaded from shared memory per k-step (registers: 128 for O, 64 for S); a warp skips tiles
// whose keys all follow its rows.
// D 128 on Hopper: 2 warpgroups of 64 rows (128-row blocks); per tile S = Q·Kᵀ (wgmma m64n64k16, Q and K from
// shared memory), the softmax on the accumulators, O += P·V (m64n128k16, P from registers); at most 128 registers,
// so two blocks share an SM. (Overlapping S_{j+1} with P_j·V_j as FlashAttention-3 does took 208 to 255 registers,
// one block per SM, and ran 25-45% slower.)
// Backward: attention_prep_bwd_bf16 rounds dO to bf16 and computes delta = rowsum(dO∘O) from that rounded dO, the
// one the products see (so that at T = 1, where dS = P∘(dP − delta) is 0 exactly, dP and delta agree up to f32
// rounding). One block per (key block, batch, key/value head), key block 0 (the longest) first; the block
// accumulates dK and dV of its keys in registers over every 64-query block at or after the key block and every
// query head of the group (so dK and dV are written once, `=`, already summed over the group). Per (query block,
// head): Sᵀ = K·Qᵀ, Pᵀ = exp2(Sᵀ·c − lse·log2 e), dPᵀ = V·dOᵀ, dSᵀ = Pᵀ∘(dPᵀ − delta); dV += Pᵀ·dO,
// dK += dSᵀ·Q; dSᵀ goes to shared memory and the block adds its share of dQ = scale·dS·K into dq with f32 atomics, two floats
// per instruction on sm_90 (dq must start zeroed; the order of the adds, and so the low bits of dq, vary from run
// to run). Q, dO, lse and delta are double-buffered: the next pair loads during the whole step. Keys that follow
// every query of the tile skip it (and their k-steps of the dQ product).
// mma.sync: W warps (8, or 4 for small grids) of 16 keys, 16·W-key blocks; the dQ product gives warp w query rows
// 16 (w % 4) and D·4/W head-dim columns. Hopper (D 128): 2 warpgroups of 64 keys (128-key blocks); Sᵀ and dPᵀ by
// wgmma m64n64k16 from shared memory, dV and dK by m64n128k16 with Pᵀ and dSᵀ from registers, and dQ [64 queries]
// [64 columns per warpgroup] by m64n64k16 with dS read from the dSᵀ tile (M-major) and K (N-major).
// wgmma's shared-memory tiles use the 128-byte swizzle: D/64 sub-tiles of [rows][64] bf16, the 16-byte chunk c of
// row r at chunk c ^ (r % 8), 1024-byte aligned; descriptors with stride 1024 bytes between 8-row groups, k-steps
// 32 bytes apart inside a row for K-major operands, 16 rows (2048 bytes) apart for M/N-major ones, whose 64-column
// sub-tiles lie rows·128 bytes apart. Writes by cp.async and st.shared are fenced (fence.proxy.async) before the
// barrier that precedes wgmma's reads.

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

// Where a thread's 16-byte chunks of a [ROWS][D] tile of a bf16 [B, T, heads, D] tensor are: THREADS threads
// share them, a thread always takes chunk column c = tid % (D / 8) of rows r0 = tid / (D / 8), r0 + STEP, ...
// (STEP = THREADS / (D / 8)), so its source pointer and tile offset only move by constant strides (the copy
// loops spend no integer work on indexing).
template <int ROWS, int D, int THREADS>
struct TileChunks {
    static constexpr int CHUNKS = D / 8, STEP = THREADS / CHUNKS, PER_THREAD = ROWS * CHUNKS / THREADS;
    static_assert(THREADS % CHUNKS == 0 && (ROWS * CHUNKS) % THREADS == 0, "chunks must split evenly");
    int c, r0;
    const bf16_t* p;  // the thread's first chunk (row t0 + r0), or `src` itself when that row is past T
    i64 stride;       // elements from one of the thread's chunks to its next
    __device__ __forceinline__ TileChunks(const bf16_t* src, int b, int t0, int head, int heads, int t)
        : c(threadIdx.x % CHUNKS), r0(threadIdx.x / CHUNKS), stride((i64)STEP * heads * D) {
        p = src + (((i64)b * t + t0 + r0) * heads + head) * D + c * 8;
    }
    // Chunk k's source: a valid address even for rows at or past T (zero-filled, not read).
    __device__ __forceinline__ const bf16_t* src(const bf16_t* base, int k, bool valid) const {
        return valid ? p + k * stride : base;
    }
};

// Starts copying rows [t0, t0 + ROWS) of head `head` of batch b of a bf16 [B, T, heads, D] tensor into a
// [ROWS][D + 8] tile, THREADS threads sharing the 16-byte chunks; rows at or past T are zero-filled.
template <int ROWS, int D, int THREADS>
__device__ __forceinline__ void ab_load_tile(bf16_t* tile, const bf16_t* src, int b, int t0, int head, int heads,
                                             int t) {
    using Tc = TileChunks<ROWS, D, THREADS>;
    const Tc tc(src, b, t0, head, heads, t);
    bf16_t* dst = tile + tc.r0 * (D + 8) + tc.c * 8;
#pragma unroll
    for (int k = 0; k < Tc::PER_THREAD; k++) {
        const bool valid = t0 + tc.r0 + k * Tc::STEP < t;
        ab_cp16(dst + k * Tc::STEP * (D + 8), tc.src(src, k, valid), valid);
    }
}

// Two adjacent values of an output (O, dK, dV) at `at` (an even element index): f32 into out, or, when out_b is
// given (bf16 q, k, v values), bf16 into out_b instead (rounded to nearest even, one 4-byte store).
__device__ __forceinline__ void ab_store_o(float* out, bf16_t* out_b, i64 at, float x, float y) {
    if (out_b)
        *reinterpret_cast<unsigned*>(out_b + at) = bf16_bits(x) | (bf16_bits(y) << 16);
    else
        *reinterpret_cast<float2*>(out + at) = make_float2(x, y);
}

// Forward, 64 query rows per block (the D 64 kernel). Grid: ceil(T/64) * B * H blocks of 128 threads (4 warps of
// 16 rows); dynamic shared memory 5 * 64 * (D + 8) bf16 (Q, two K and two V tiles).
template <int D>
__device__ void attention_fwd_bf16_rows64(float* out, bf16_t* out_b, float* lse, const bf16_t* q, const bf16_t* k, const bf16_t* v, int nb,
                                   int t, int h, int g, float scale) {
    constexpr int SD = D + 8, KD = D / 16, ND = D / 8, TILE = 64;  // k-steps and n-tiles over the head dim
    extern __shared__ uint4 ab_smem[];
    bf16_t* qs = reinterpret_cast<bf16_t*>(ab_smem);
    bf16_t* ks = qs + TILE * SD;          // [2][64][SD]
    bf16_t* vs = ks + 2 * TILE * SD;      // [2][64][SD]
    const int nqb = (t + TILE - 1) / TILE;
    const int bh = blockIdx.x % (nb * h);
    const int qb = nqb - 1 - blockIdx.x / (nb * h);  // the longest rows start first
    const int b = bh / h, head = bh % h, kvh = head / (h / g), q0 = qb * TILE;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gi = lane / 4, ti = lane % 4;
    const int row0 = q0 + warp * 16 + gi;  // this thread's rows: row0 and row0 + 8
    const float c = scale * AB_LOG2E;

    ab_load_tile<TILE, D, 128>(qs, q, b, q0, head, h, t);
    ab_load_tile<TILE, D, 128>(ks, k, b, 0, kvh, g, t);
    ab_load_tile<TILE, D, 128>(vs, v, b, 0, kvh, g, t);
    ab_cp_commit();

    unsigned qf[KD][4];
    float o[ND][4];
#pragma unroll
    for (int n = 0; n < ND; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m[2] = {AB_NEG_INF, AB_NEG_INF}, l[2] = {0.0f, 0.0f};  // l: this thread's share of the row sums

    for (int j = 0; j <= qb; j++) {
        ab_cp_wait_all();
        __syncthreads();  // tile j is in; every warp is done with tile j - 1, whose buffers tile j + 1 takes
        if (j < qb) {
            const int nxt = (j + 1) & 1;
            ab_load_tile<TILE, D, 128>(ks + nxt * TILE * SD, k, b, (j + 1) * TILE, kvh, g, t);
            ab_load_tile<TILE, D, 128>(vs + nxt * TILE * SD, v, b, (j + 1) * TILE, kvh, g, t);
            ab_cp_commit();
        }
        if (j == 0) {
#pragma unroll
            for (int kk = 0; kk < KD; kk++)
                ab_ldsm(qf[kk], qs + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SD + kk * 16 + (lane >> 4) * 8);
        }
        const bf16_t* kt = ks + (j & 1) * TILE * SD;
        const bf16_t* vt = vs + (j & 1) * TILE * SD;
        float s[8][4];
#pragma unroll
        for (int n = 0; n < 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KD; kk++)
#pragma unroll
            for (int np = 0; np < 4; np++) {
                unsigned f[4];
                ab_ldsm(f, kt + (np * 16 + (lane & 7) + (lane >> 4) * 8) * SD + kk * 16 + ((lane >> 3) & 1) * 8);
                ab_mma(s[2 * np], qf[kk], f[0], f[1]);
                ab_mma(s[2 * np + 1], qf[kk], f[2], f[3]);
            }
        // Keys k0 + 8n + 2ti + (e & 1) for rows row0 + 8 (e >> 1); only the diagonal tile (j == qb) holds keys
        // after a row or at or past T.
        const int k0 = j * TILE;
        float mx[2] = {AB_NEG_INF, AB_NEG_INF};
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int key = k0 + n * 8 + 2 * ti + (e & 1), row = row0 + (e >> 1) * 8;
                float x = s[n][e] * c;
                if (j == qb && (key > row || key >= t)) x = AB_NEG_INF;
                s[n][e] = x;
                mx[e >> 1] = fmaxf(mx[e >> 1], x);
            }
        float corr[2], mu[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float m_new = fmaxf(m[r], mx[r]);
            // Every row meets key k0 <= row in its first tile, so m_new is finite; the guard keeps a row with no
            // valid key at 0 rather than NaN.
            mu[r] = m_new == AB_NEG_INF ? 0.0f : m_new;
            corr[r] = ab_exp2(m[r] - mu[r]);  // 0 on the first tile (m = -inf)
            m[r] = m_new;
            l[r] *= corr[r];
        }
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float p = ab_exp2(s[n][e] - mu[e >> 1]);
                s[n][e] = p;
                l[e >> 1] += p;
            }
#pragma unroll
        for (int n = 0; n < ND; n++) {
            o[n][0] *= corr[0];
            o[n][1] *= corr[0];
            o[n][2] *= corr[1];
            o[n][3] *= corr[1];
        }
        // O += P·V: P's A fragments straight from the score registers, V through ldmatrix.trans.
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            unsigned pa[4];
            ab_c_to_a(pa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int dp = 0; dp < D / 16; dp++) {
                unsigned f[4];
                ab_ldsm_t(f, vt + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SD + dp * 16 + (lane >> 4) * 8);
                ab_mma(o[2 * dp], pa, f[0], f[1]);
                ab_mma(o[2 * dp + 1], pa, f[2], f[3]);
            }
        }
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
        for (int n = 0; n < ND; n++) ab_store_o(out, out_b, at + n * 8, o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
        if (ti == 0) lse[((i64)b * h + head) * t + row] = (m[r] + log2f(l[r])) * AB_LN2;
    }
}

// Forward, 64·MT query rows per block (the D 128 kernel off Hopper, MT 2). Grid: ceil(T / (64·MT)) * B * H blocks
// of 128 threads (4 warps of 16·MT query rows); dynamic shared memory (64·MT + 4·64) * (D + 8) bf16 (Q, two K and
// two V tiles).
template <int D, int MT>
__device__ void attention_fwd_bf16(float* out, bf16_t* out_b, float* lse, const bf16_t* q, const bf16_t* k, const bf16_t* v, int nb,
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
        // first row or past T hold masked keys: the mask is a branch of its own (as a select inside the max loop it
        // would cost every tile its compares).
        if (k0 + AB_KEYS - 1 > wrow || k0 + AB_KEYS > t) {
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int n = 0; n < 8; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int key = k0 + n * 8 + 2 * ti + (e & 1), row = wrow + mt * 16 + (e >> 1) * 8 + gi;
                        if (key > row || key >= t) s[mt][n][e] = AB_NEG_INF;
                    }
        }
        float mx[2 * MT];
#pragma unroll
        for (int r = 0; r < 2 * MT; r++) mx[r] = AB_NEG_INF;
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) mx[2 * mt + (e >> 1)] = fmaxf(mx[2 * mt + (e >> 1)], s[mt][n][e]);
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
            const i64 at = (((i64)b * t + row) * h + head) * D + 2 * ti;
#pragma unroll
            for (int n = 0; n < ND; n++)
                ab_store_o(out, out_b, at + n * 8, o[mt][n][2 * r] * inv, o[mt][n][2 * r + 1] * inv);
            if (ti == 0) lse[((i64)b * h + head) * t + row] = (m[2 * mt + r] * c + log2f(lr)) * AB_LN2;
        }
}

// out (f32) or out_b (bf16): the launcher passes one of them, the other null.
extern "C" __global__ void __launch_bounds__(128)
    attention_fwd_bf16_d64(float* out, bf16_t* out_b, float* lse, const bf16_t* q, const bf16_t* k, const bf16_t* v,
                           int nb, int t, int h, int g, float scale) {
    attention_fwd_bf16_rows64<64>(out, out_b, lse, q, k, v, nb, t, h, g, scale);
}
extern "C" __global__ void __launch_bounds__(128)
    attention_fwd_bf16_d128(float* out, bf16_t* out_b, float* lse, const bf16_t* q, const bf16_t* k,
                            const bf16_t* v, int nb, int t, int h, int g, float scale) {
    attention_fwd_bf16<128, 2>(out, out_b, lse, q, k, v, nb, t, h, g, scale);
}
