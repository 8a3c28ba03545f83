// fake_quant: EfficientQAT's asymmetric uniform quantizer per group of g consecutive weights (one row of w
// [N, K] holds K/g groups; group j has scales[j], zeros[j]). See src/quant/fake_quant/mod.rs for the formulas:
//   s = clamp(scale, 1e-4, 1e4), zr = clamp(rint(zero), 0, qmax), x = w / s, p = rint(x) + zr,
//   q = clamp(p, 0, qmax), out = (q - zr) * s;  m = [0 <= p <= qmax]
//   dw = dout * m,  ds = sum_group dout * (q - zr - m * x),  dz = -s * sum_{group, !m} dout

// A group's clamped scale s and rounded zero point zr, and one value
//   x = w / s, p = rint(x) + zr, q = clamp(p, 0, qmax), ŵ = (q - zr) * s.
// rintf rounds half to even (torch.round); w / s is IEEE division (NVRTC's default --prec-div=true), so the values
// equal the CPU path's f32 values exactly.
#define FAKE_QUANT_SCALE_MIN 1e-4f
#define FAKE_QUANT_SCALE_MAX 1e4f
__device__ __forceinline__ float fake_quant_scale(float scale) {
    return fminf(fmaxf(scale, FAKE_QUANT_SCALE_MIN), FAKE_QUANT_SCALE_MAX);
}
__device__ __forceinline__ float fake_quant_zero(float zero, float qmax) {
    return fminf(fmaxf(rintf(zero), 0.0f), qmax);
}
__device__ __forceinline__ float fake_quant_value(float w, float s, float zr, float qmax) {
    const float p = rintf(w / s) + zr;
    return (fminf(fmaxf(p, 0.0f), qmax) - zr) * s;
}

// One element of fake-quant's backward with m = [0 <= p <= qmax]: returns dw = dout * m and adds dout * (q - zr -
// m * x) into the group's ds_acc and the out-of-range dout into `clamped` (dz = -s * clamped).
__device__ __forceinline__ float fake_quant_bwd_elem(float gv, float wv, float s, float zr, float qmax,
                                                     float& ds_acc, float& clamped) {
    const float x = wv / s;
    const float p = rintf(x) + zr;
    const bool m = p >= 0.0f && p <= qmax;
    const float q = fminf(fmaxf(p, 0.0f), qmax);
    ds_acc = __fadd_rn(ds_acc, __fmul_rn(gv, __fsub_rn(__fsub_rn(q, zr), m ? x : 0.0f)));  // never contracted
    if (!m) clamped += gv;
    return m ? gv : 0.0f;
}

extern "C" __global__ void fake_quant_fwd_f32(float* out, const float* w, const float* scales, const float* zeros,
                                              i64 n, i64 g, float qmax) {
    for (i64 i = global_index(); i < n; i += grid_stride()) {
        const i64 j = i / g;
        out[i] = fake_quant_value(w[i], fake_quant_scale(scales[j]), fake_quant_zero(zeros[j], qmax), qmax);
    }
}

// The group layout of the backward and of the fused optimizer step (the same order of every sum, so the two give
// the same bits). With g a multiple of 64 a team of FQ_TEAM = 8 lanes takes a group, 4 groups per warp, each lane
// 8 adjacent weights of every 64 (two 16-byte accesses per array); the per-group work (scalar loads, sums across
// the team, the scale's update) is then spread over 8 weights per lane instead of 2, which the fused step, bound
// by instructions as much as by memory, needs. Other g: a whole warp per group, lanes striding over it.
#define FQ_TEAM 8
#define FQ_TEAMS_PER_WARP (32 / FQ_TEAM)

// Sum over a team (xor butterfly within FQ_TEAM lanes): every lane of the team gets its team's total.
__device__ __forceinline__ float team_sum(float v) {
    for (int o = FQ_TEAM / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

struct float8 {
    float4 lo, hi;
};
__device__ __forceinline__ float8 load8(const float* p) {
    return {reinterpret_cast<const float4*>(p)[0], reinterpret_cast<const float4*>(p)[1]};
}
__device__ __forceinline__ void store8(float* p, const float8& v) {
    reinterpret_cast<float4*>(p)[0] = v.lo;
    reinterpret_cast<float4*>(p)[1] = v.hi;
}
// dŵ arrives in f32, or in bf16 (bits as unsigned short) from the bf16 mode's dŵ GEMM, which rounds it as
// torch.autocast's bf16 matmul does; widening bf16 to f32 is exact.
__device__ __forceinline__ float bf16_lo(unsigned int u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf16_hi(unsigned int u) { return __uint_as_float(u & 0xffff0000u); }
__device__ __forceinline__ float8 widen8(uint4 u) {
    return {make_float4(bf16_lo(u.x), bf16_hi(u.x), bf16_lo(u.y), bf16_hi(u.y)),
            make_float4(bf16_lo(u.z), bf16_hi(u.z), bf16_lo(u.w), bf16_hi(u.w))};
}
__device__ __forceinline__ float8 load8(const unsigned short* p) { return widen8(*reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ float grad_value(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ float grad_value(const unsigned short* p, i64 i) { return bf16_lo(p[i]); }

// Element e of v; called with constant e (unrolled loops), so it resolves to a register.
__device__ __forceinline__ float& at(float8& v, int e) {
    switch (e) {
        case 0: return v.lo.x;
        case 1: return v.lo.y;
        case 2: return v.lo.z;
        case 3: return v.lo.w;
        case 4: return v.hi.x;
        case 5: return v.hi.y;
        case 6: return v.hi.z;
        default: return v.hi.w;
    }
}

// Where this thread works: groups first + team, first + team + step, ... (first is the warp's first group of a
// round, the same for all its lanes), as lane `lane` of `width`.
struct GroupLane {
    i64 first, step;
    int team, lane, width;
};
__device__ __forceinline__ GroupLane group_lane(bool teams) {
    const int lane = threadIdx.x & 31;
    const i64 warp = global_index() >> 5, warps = (i64)gridDim.x * (blockDim.x >> 5);
    if (teams) return {warp * FQ_TEAMS_PER_WARP, warps * FQ_TEAMS_PER_WARP, lane / FQ_TEAM, lane % FQ_TEAM, FQ_TEAM};
    return {warp, warps, 0, lane, 32};
}

// A team's or warp's sum (above); every lane of the warp must call it.
__device__ __forceinline__ float group_sum(float v, bool teams) { return teams ? team_sum(v) : warp_sum(v); }

// dw, ds and dz, each of which may be null, in the layout above, from dout in f32 or bf16 (G). A team past the
// last group computes nothing but takes part in the sums.
template <typename G>
__device__ void fake_quant_bwd(float* dw, float* ds, float* dz, const G* dout, const float* w, const float* scales,
                               const float* zeros, i64 n_groups, i64 g, float qmax) {
    const bool teams = (g & 63) == 0;
    const GroupLane t = group_lane(teams);
    for (i64 first = t.first; first < n_groups; first += t.step) {
        const i64 j = first + t.team;
        const bool live = j < n_groups;
        const float s = live ? fake_quant_scale(scales[j]) : 1.0f;
        const float zr = live ? fake_quant_zero(zeros[j], qmax) : 0.0f;
        float ds_acc = 0.0f, clamped = 0.0f;
        if (live && teams) {
            for (i64 c = 8 * t.lane; c < g; c += 64) {
                const i64 i = j * g + c;  // a multiple of 8: 32-byte aligned
                float8 gv = load8(dout + i), wv = load8(w + i);
#pragma unroll
                for (int e = 0; e < 8; e++)
                    at(wv, e) = fake_quant_bwd_elem(at(gv, e), at(wv, e), s, zr, qmax, ds_acc, clamped);
                if (dw) store8(dw + i, wv);
            }
        } else if (live) {
            for (i64 e = t.lane; e < g; e += 32) {
                const i64 i = j * g + e;
                const float d = fake_quant_bwd_elem(grad_value(dout, i), w[i], s, zr, qmax, ds_acc, clamped);
                if (dw) dw[i] = d;
            }
        }
        ds_acc = group_sum(ds_acc, teams);
        clamped = group_sum(clamped, teams);
        if (live && t.lane == 0) {
            if (ds) ds[j] = ds_acc;
            if (dz) dz[j] = -s * clamped;
        }
    }
}
extern "C" __global__ void fake_quant_bwd_f32(float* dw, float* ds, float* dz, const float* dout, const float* w,
                                              const float* scales, const float* zeros, i64 n_groups, i64 g,
                                              float qmax) {
    fake_quant_bwd(dw, ds, dz, dout, w, scales, zeros, n_groups, g, qmax);
}
extern "C" __global__ void fake_quant_bwd_bf16(float* dw, float* ds, float* dz, const unsigned short* dout,
                                               const float* w, const float* scales, const float* zeros,
                                               i64 n_groups, i64 g, float qmax) {
    fake_quant_bwd(dw, ds, dz, dout, w, scales, zeros, n_groups, g, qmax);
}

// AdamW's step for a fake-quantized weight, given the gradient of its fake-quantized value dŵ in bf16 (as the bf16
// mode's dŵ GEMM writes it): per group, fake-quant's backward (dŵ -> dw, ds, dz, as fake_quant_bwd_bf16 in the same
// layout and order), AdamW on w (coefficients cw), on the scale and the zero point (cq), and the next forward's ŵ
// in bf16 from the updated values (fake_quant_fwd_bf16's arithmetic): one pass instead of three kernels, 28 bytes
// per weight instead of 48, the same bits. Two kernels share the pieces below: fake_quant_adamw_g64_f32 for g = 64
// (the recipe's), software-pipelined, and fake_quant_adamw_f32 for every g.

// A lane's 8 adjacent weights of a group: fake-quant's backward of dŵ (adding into the group's ds_acc and
// clamped) and AdamW on w, m, v in place.
__device__ __forceinline__ void fused_chunk_step(float8& wv, float8& mv, float8& vv, float8 gv, float s, float zr,
                                                 float qmax, const AdamWCoefs& cw, float& ds_acc, float& clamped) {
#pragma unroll
    for (int e = 0; e < 8; e++) {
        const float d = fake_quant_bwd_elem(at(gv, e), at(wv, e), s, zr, qmax, ds_acc, clamped);
        at(wv, e) = adamw_elem(at(wv, e), d, at(mv, e), at(vv, e), cw);
    }
}

// The next forward's ŵ_b of 8 updated weights, as one 16-byte word.
__device__ __forceinline__ uint4 fused_chunk_wq(float8 wv, float s2, float zr2, float qmax) {
    unsigned int b[4];
#pragma unroll
    for (int e = 0; e < 4; e++)
        b[e] = bf16_bits(fake_quant_value(at(wv, 2 * e), s2, zr2, qmax)) |
               (bf16_bits(fake_quant_value(at(wv, 2 * e + 1), s2, zr2, qmax)) << 16);
    return make_uint4(b[0], b[1], b[2], b[3]);
}

// A group's quantizer parameters and their moments, loaded with its weights: one memory latency per group.
struct GroupScalars {
    float s_raw, z_raw, ms, vs, mz, vz;
};
__device__ __forceinline__ GroupScalars load_group_scalars(i64 j, const float* scales, const float* ms,
                                                           const float* vs, const float* zeros, const float* mz,
                                                           const float* vz) {
    return {scales[j], zeros[j], ms[j], vs[j], mz[j], vz[j]};
}

// AdamW on group j's scale (gradient ds) and zero point (dz), stored by lane 0; returns the clamped new scale and
// rounded new zero point that the next forward quantizes with.
__device__ __forceinline__ float2 fused_group_step(GroupScalars q, float ds, float dz, i64 j, int lane, float qmax,
                                                   const AdamWCoefs& cq, float* scales, float* ms, float* vs,
                                                   float* zeros, float* mz, float* vz) {
    const float s_new = adamw_elem(q.s_raw, ds, q.ms, q.vs, cq);
    const float z_new = adamw_elem(q.z_raw, dz, q.mz, q.vz, cq);
    if (lane == 0) {
        scales[j] = s_new, ms[j] = q.ms, vs[j] = q.vs;
        zeros[j] = z_new, mz[j] = q.mz, vz[j] = q.vz;
    }
    return make_float2(fake_quant_scale(s_new), fake_quant_zero(z_new, qmax));
}

#define FUSED_ADAMW_PARAMS                                                                                           \
    float *w, float *mw, float *vw, const unsigned short *dwq, float *scales, float *ms, float *vs, float *zeros,    \
        float *mz, float *vz, unsigned short *wq, i64 n_groups, i64 g, float qmax, float w_decay, float w_beta2,     \
        float w_omb1, float w_omb2, float w_step_size, float w_bc2_sqrt, float w_eps, float q_decay, float q_beta2, \
        float q_omb1, float q_omb2, float q_step_size, float q_bc2_sqrt, float q_eps
#define FUSED_ADAMW_COEFS                                                                         \
    const AdamWCoefs cw = {w_decay, w_beta2, w_omb1, w_omb2, w_step_size, w_bc2_sqrt, w_eps}; \
    const AdamWCoefs cq = {q_decay, q_beta2, q_omb1, q_omb2, q_step_size, q_bc2_sqrt, q_eps}

// g = 64 in teams (a lane's 8 weights are its whole share of a group): the loads of the lane's next group are
// issued before the current group's arithmetic, so two groups' bytes are in flight per lane (ncu at 7B: 2.23 ->
// 2.04 ms for the step's seven weights, 75% -> 82% of the DRAM peak).
struct GroupIn {
    uint4 gv;  // 8 bf16 of dŵ, widened when used
    float8 wv, mv, vv;
    GroupScalars q;
};
extern "C" __global__ void fake_quant_adamw_g64_f32(FUSED_ADAMW_PARAMS) {
    FUSED_ADAMW_COEFS;
    const GroupLane t = group_lane(true);
    auto load = [&](i64 j, GroupIn& in) {
        const i64 i = j * 64 + 8 * t.lane;
        in.gv = *reinterpret_cast<const uint4*>(dwq + i);
        in.wv = load8(w + i), in.mv = load8(mw + i), in.vv = load8(vw + i);
        in.q = load_group_scalars(j, scales, ms, vs, zeros, mz, vz);
    };
    GroupIn cur;
    if (t.first + t.team < n_groups) load(t.first + t.team, cur);
    for (i64 first = t.first; first < n_groups; first += t.step) {
        const i64 j = first + t.team, i = j * 64 + 8 * t.lane;
        GroupIn next;
        if (j + t.step < n_groups) load(j + t.step, next);
        const bool live = j < n_groups;
        float ds_acc = 0.0f, clamped = 0.0f, s = 1.0f;
        if (live) {
            s = fake_quant_scale(cur.q.s_raw);
            const float zr = fake_quant_zero(cur.q.z_raw, qmax);
            fused_chunk_step(cur.wv, cur.mv, cur.vv, widen8(cur.gv), s, zr, qmax, cw, ds_acc, clamped);
            store8(w + i, cur.wv);
            store8(mw + i, cur.mv);
            store8(vw + i, cur.vv);
        }
        // Every lane of the team takes part in the sums.
        const float ds = team_sum(ds_acc);
        const float dz = -s * team_sum(clamped);
        if (live) {
            const float2 q2 = fused_group_step(cur.q, ds, dz, j, t.lane, qmax, cq, scales, ms, vs, zeros, mz, vz);
            reinterpret_cast<uint4*>(wq)[i / 8] = fused_chunk_wq(cur.wv, q2.x, q2.y, qmax);
        }
        cur = next;
    }
}

// Every g: teams when g is a multiple of 64, else a warp per group. A lane keeps its updated weights in registers
// for the last pass when g <= 128 (teams) and otherwise reads back only what it wrote itself.
extern "C" __global__ void fake_quant_adamw_f32(FUSED_ADAMW_PARAMS) {
    FUSED_ADAMW_COEFS;
    const bool teams = (g & 63) == 0;
    const bool in_regs = teams && g <= 128;
    const GroupLane t = group_lane(teams);
    for (i64 first = t.first; first < n_groups; first += t.step) {
        const i64 j = first + t.team;
        const bool live = j < n_groups;
        GroupScalars q = {1.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        if (live) q = load_group_scalars(j, scales, ms, vs, zeros, mz, vz);
        const float s = fake_quant_scale(q.s_raw), zr = fake_quant_zero(q.z_raw, qmax);
        float ds_acc = 0.0f, clamped = 0.0f;
        float8 kept[2];
        if (live && teams) {
            for (i64 c = 8 * t.lane, k = 0; c < g; c += 64, k++) {
                const i64 i = j * g + c;
                float8 wv = load8(w + i), mv = load8(mw + i), vv = load8(vw + i);
                fused_chunk_step(wv, mv, vv, load8(dwq + i), s, zr, qmax, cw, ds_acc, clamped);
                store8(w + i, wv);
                store8(mw + i, mv);
                store8(vw + i, vv);
                // Constant indices keep `kept` in registers.
                if (k == 0) kept[0] = wv;
                if (k == 1) kept[1] = wv;
            }
        } else if (live) {
            for (i64 e = t.lane; e < g; e += 32) {
                const i64 i = j * g + e;
                float mi = mw[i], vi = vw[i];
                const float d = fake_quant_bwd_elem(grad_value(dwq, i), w[i], s, zr, qmax, ds_acc, clamped);
                w[i] = adamw_elem(w[i], d, mi, vi, cw);
                mw[i] = mi;
                vw[i] = vi;
            }
        }
        const float ds = group_sum(ds_acc, teams);
        const float dz = -s * group_sum(clamped, teams);
        if (live) {
            const float2 q2 = fused_group_step(q, ds, dz, j, t.lane, qmax, cq, scales, ms, vs, zeros, mz, vz);
            if (teams) {
                for (i64 c = 8 * t.lane, k = 0; c < g; c += 64, k++) {
                    const i64 i = j * g + c;
                    const float8 wv = !in_regs ? load8(w + i) : k == 0 ? kept[0] : kept[1];
                    reinterpret_cast<uint4*>(wq)[i / 8] = fused_chunk_wq(wv, q2.x, q2.y, qmax);
                }
            } else {
                for (i64 e = t.lane; e < g; e += 32) {
                    const i64 i = j * g + e;
                    wq[i] = (unsigned short)bf16_bits(fake_quant_value(w[i], q2.x, q2.y, qmax));
                }
            }
        }
    }
}

// Min-max init (see the module header), one warp per group: s = clamp((xmax - xmin) / qmax, 1e-4, 1e4),
// z = rint(-clamp(xmin / s, -1e4, 1e4)). min, max, IEEE division and rintf give the CPU path's values exactly.
// A non-finite weight sets bad[0] = 1 (the launcher turns that into an error).
extern "C" __global__ void fake_quant_init_minmax_f32(float* scales, float* zeros, float* bad, const float* w,
                                                      i64 n_groups, i64 g, float qmax) {
    const int lane = threadIdx.x & 31;
    const i64 warps = (i64)gridDim.x * (blockDim.x >> 5);
    for (i64 j = global_index() >> 5; j < n_groups; j += warps) {
        float lo = __int_as_float(0x7f800000), hi = -lo;  // +inf, -inf
        bool finite = true;
        for (i64 e = lane; e < g; e += 32) {
            const float v = w[j * g + e];
            finite = finite && (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
            lo = fminf(lo, v);
            hi = fmaxf(hi, v);
        }
        for (int o = 16; o > 0; o >>= 1) {
            lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
            hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
        }
        if (!__all_sync(0xffffffffu, finite) && lane == 0) bad[0] = 1.0f;
        if (lane == 0) {
            const float s = fake_quant_scale((hi - lo) / qmax);
            scales[j] = s;
            zeros[j] = rintf(-fminf(fmaxf(lo / s, -1e4f), 1e4f));
        }
    }
}

// The forward written straight to bf16 (the bf16 mixed-precision mode's GEMM operand): out[i] = bf16(ŵ[i]),
// ŵ as fake_quant_fwd_f32. Four values per thread (16-byte loads, 8-byte stores; the launcher checks that n is a
// multiple of 4); each value looks up its own group, so g need not be.
extern "C" __global__ void fake_quant_fwd_bf16(unsigned short* out, const float* w, const float* scales,
                                               const float* zeros, i64 n, i64 g, float qmax) {
    const i64 quads = n / 4;
    for (i64 q = global_index(); q < quads; q += grid_stride()) {
        const float4 v = reinterpret_cast<const float4*>(w)[q];
        const float x[4] = {v.x, v.y, v.z, v.w};
        unsigned int b[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const i64 j = (q * 4 + e) / g;
            b[e] = bf16_bits(fake_quant_value(x[e], fake_quant_scale(scales[j]), fake_quant_zero(zeros[j], qmax), qmax));
        }
        reinterpret_cast<uint2*>(out)[q] = make_uint2(b[0] | (b[1] << 16), b[2] | (b[3] << 16));
    }
}
