// store: the Block-AP activation streams held in GPU memory (src/train/device_store.rs). The f16 layout keeps the
// host store's values: f32 -> f16 rounds to nearest even with overflow to infinity (PTX cvt.rn, as half's
// f16::from_f32), f16 -> f32 is exact. The f32 copy serves the f32 store and cuts row ranges out of a tensor.
// Written with inline PTX because NVRTC has no include path for cuda_fp16.h.

extern "C" __global__ void store_write_f16(unsigned short* store, const float* x, i64 n) {
    for (i64 i = global_index(); i < n; i += grid_stride()) {
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x[i]));
        store[i] = h;
    }
}

extern "C" __global__ void store_read_f16(float* out, const unsigned short* store, i64 n) {
    for (i64 i = global_index(); i < n; i += grid_stride()) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(store[i]));
        out[i] = f;
    }
}

extern "C" __global__ void store_copy_f32(float* out, const float* x, i64 n) {
    for (i64 i = global_index(); i < n; i += grid_stride()) out[i] = x[i];
}
