// Bandwidth ceiling of the fused step's stream mix (per weight: read g bf16, w, m, v f32; write w, m, v f32 and wq
// bf16: 28 bytes) with plain vectorized grid-stride kernels in several launch shapes, beside a copy kernel and
// cudaMemcpy moving the same bytes. On the device: `nvcc -O3 -arch=sm_90 -o streams step_streams_gpu.cu && ./streams`.
#include <cstdio>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
// AdamW-like arithmetic on 4 weights: enough work to be a real kernel, not enough to bind it.
__device__ __forceinline__ void update4(float4& w, float4& m, float4& v, __nv_bfloat162 g0, __nv_bfloat162 g1) {
  float gx[4] = {__low2float(g0), __high2float(g0), __low2float(g1), __high2float(g1)};
  float* pw = &w.x; float* pm = &m.x; float* pv = &v.x;
#pragma unroll
  for (int k = 0; k < 4; k++) {
    pm[k] = 0.9f * pm[k] + 0.1f * gx[k];
    pv[k] = 0.999f * pv[k] + 0.001f * gx[k] * gx[k];
    pw[k] -= 1e-4f * pm[k] * rsqrtf(pv[k] + 1e-8f);
  }
}
// Element i of the stream mix: 4 weights' loads, update and stores.
__device__ __forceinline__ void step4(const __nv_bfloat162* __restrict__ g, float4* __restrict__ w,
                                      float4* __restrict__ m, float4* __restrict__ v,
                                      __nv_bfloat162* __restrict__ wq, size_t i) {
  float4 a = w[i], b = m[i], c = v[i];
  update4(a, b, c, g[2 * i], g[2 * i + 1]);
  w[i] = a; m[i] = b; v[i] = c;
  wq[2 * i] = __floats2bfloat162_rn(a.x, a.y);
  wq[2 * i + 1] = __floats2bfloat162_rn(a.z, a.w);
}
// One element a thread per iteration.
__global__ void mix(const __nv_bfloat162* __restrict__ g, float4* __restrict__ w, float4* __restrict__ m,
                    float4* __restrict__ v, __nv_bfloat162* __restrict__ wq, size_t n4) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n4; i += (size_t)gridDim.x * blockDim.x)
    step4(g, w, m, v, wq, i);
}
// Two elements a thread per iteration, both loaded before either is stored.
__global__ void mix2(const __nv_bfloat162* __restrict__ g, float4* __restrict__ w, float4* __restrict__ m,
                     float4* __restrict__ v, __nv_bfloat162* __restrict__ wq, size_t n4) {
  size_t stride = (size_t)gridDim.x * blockDim.x;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n4; i += 2 * stride) {
    size_t j = i + stride;
    bool two = j < n4;
    float4 a0 = w[i], b0 = m[i], c0 = v[i], a1, b1, c1;
    __nv_bfloat162 g00 = g[2 * i], g01 = g[2 * i + 1], g10, g11;
    if (two) { a1 = w[j]; b1 = m[j]; c1 = v[j]; g10 = g[2 * j]; g11 = g[2 * j + 1]; }
    update4(a0, b0, c0, g00, g01);
    w[i] = a0; m[i] = b0; v[i] = c0;
    wq[2 * i] = __floats2bfloat162_rn(a0.x, a0.y); wq[2 * i + 1] = __floats2bfloat162_rn(a0.z, a0.w);
    if (two) {
      update4(a1, b1, c1, g10, g11);
      w[j] = a1; m[j] = b1; v[j] = c1;
      wq[2 * j] = __floats2bfloat162_rn(a1.x, a1.y); wq[2 * j + 1] = __floats2bfloat162_rn(a1.z, a1.w);
    }
  }
}
__global__ void copy4(const float4* __restrict__ a, float4* __restrict__ b, size_t n4) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n4; i += (size_t)gridDim.x * blockDim.x) b[i] = a[i];
}
int main() {
  size_t n = 28672ull * 8192;  // one 70B gate weight
  size_t n4 = n / 4;
  void *g, *w, *m, *v, *wq, *c0, *c1;
  cudaMalloc(&g, n * 2); cudaMalloc(&w, n * 4); cudaMalloc(&m, n * 4); cudaMalloc(&v, n * 4); cudaMalloc(&wq, n * 2);
  cudaMalloc(&c0, n * 14); cudaMalloc(&c1, n * 14);
  cudaMemset(g, 0, n * 2); cudaMemset(w, 0, n * 4); cudaMemset(m, 0, n * 4); cudaMemset(v, 0, n * 4);
  cudaMemset(c0, 0, n * 14);
  int sms; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
  double bytes = 28.0 * n;
  for (int kind = 0; kind < 4; kind++) {
    int cfgs[][2] = {{256, 4}, {256, 8}, {512, 4}, {1024, 2}, {256, 16}, {128, 16}, {256, 64}, {1024, 1}};
    for (auto& c : cfgs) {
      int threads = c[0], blocks = sms * c[1];
      auto launch = [&]() {
        if (kind == 0) mix<<<blocks, threads>>>((__nv_bfloat162*)g, (float4*)w, (float4*)m, (float4*)v, (__nv_bfloat162*)wq, n4);
        else if (kind == 1) mix2<<<blocks, threads>>>((__nv_bfloat162*)g, (float4*)w, (float4*)m, (float4*)v, (__nv_bfloat162*)wq, n4);
        else if (kind == 2) copy4<<<blocks, threads>>>((float4*)c0, (float4*)c1, n * 14 / 16);
        else cudaMemcpyAsync(c1, c0, n * 14, cudaMemcpyDeviceToDevice);
      };
      for (int r = 0; r < 3; r++) launch();
      cudaEventRecord(e0);
      for (int r = 0; r < 20; r++) launch();
      cudaEventRecord(e1); cudaEventSynchronize(e1);
      float ms; cudaEventElapsedTime(&ms, e0, e1); ms /= 20;
      const char* names[] = {"mix", "mix x2", "copy4 (same bytes)", "cudaMemcpy (same bytes)"};
      printf("%-24s %4d thr x %3d/SM: %7.3f ms  %.3f TB/s\n", names[kind], threads, c[1], ms, bytes / ms / 1e9);
      if (kind == 3) break;
    }
  }
  cudaError_t err = cudaGetLastError(); printf("%s\n", cudaGetErrorString(err));
}
