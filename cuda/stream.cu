// stream: conversions between the f16 values of the host activation store (train::stream) and the f32 tensors
// of a training step. Inline PTX cvt, because NVRTC has no include path for cuda_fp16.h. f16 -> f32 is exact;
// f32 -> f16 rounds to nearest even with overflow to infinity, as half::f16::from_f32 does on the host, so a
// value stored from the GPU reads back bit-identical to one stored from the CPU.

extern "C" __global__ void stream_f16_to_f32(float* out, const unsigned short* in, i64 n) {
    for (i64 i = global_index(); i < n; i += grid_stride()) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(in[i]));
        out[i] = f;
    }
}

extern "C" __global__ void stream_f32_to_f16(unsigned short* out, const float* in, i64 n) {
    for (i64 i = global_index(); i < n; i += grid_stride()) {
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(in[i]));
        out[i] = h;
    }
}
