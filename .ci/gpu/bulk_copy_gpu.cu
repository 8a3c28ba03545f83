// Can TMA bulk copies (cp.async.bulk through shared memory, one issuing thread a block, S stages of CHUNK bytes)
// beat an SM copy kernel's ~2.85 TB/s and reach cudaMemcpy's ~3.0? On the device:
// `nvcc -O3 -arch=sm_90a -o bulk bulk_copy_gpu.cu && ./bulk`.
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>
__device__ __forceinline__ uint32_t sa(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
template <int S, int CHUNK>
__global__ void bulk_copy(const char* __restrict__ src, char* __restrict__ dst, size_t nchunks) {
  extern __shared__ __align__(128) char smem[];
  __shared__ __align__(8) uint64_t bar[S];
  if (threadIdx.x != 0) return;
  for (int s = 0; s < S; s++) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(sa(&bar[s])));
  asm volatile("fence.mbarrier_init.release.cluster;");
  size_t first = blockIdx.x, step = gridDim.x;
  size_t mine = first < nchunks ? (nchunks - first + step - 1) / step : 0;
  auto load = [&](size_t k) {
    int s = k % S;
    size_t c = first + k * step;
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(sa(&bar[s])), "r"(CHUNK));
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(sa(smem + s * CHUNK)), "l"(src + c * CHUNK), "r"(CHUNK), "r"(sa(&bar[s])) : "memory");
  };
  for (size_t k = 0; k < S - 1 && k < mine; k++) load(k);
  for (size_t k = 0; k < mine; k++) {
    int s = k % S; uint32_t par = (k / S) & 1, done = 0;
    while (!done) asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                               : "=r"(done) : "r"(sa(&bar[s])), "r"(par) : "memory");
    size_t c = first + k * step;
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst + c * CHUNK), "r"(sa(smem + s * CHUNK)), "r"(CHUNK) : "memory");
    asm volatile("cp.async.bulk.commit_group;");
    asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
    if (k + S - 1 < mine) load(k + S - 1);
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}
template <int S, int CHUNK>
void run(const char* name, char* a, char* b, size_t bytes, int per_sm, int sms) {
  auto k = bulk_copy<S, CHUNK>;
  cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, S * CHUNK);
  size_t nchunks = bytes / CHUNK;
  cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
  for (int r = 0; r < 3; r++) k<<<sms * per_sm, 32, S * CHUNK>>>(a, b, nchunks);
  cudaEventRecord(e0);
  for (int r = 0; r < 20; r++) k<<<sms * per_sm, 32, S * CHUNK>>>(a, b, nchunks);
  cudaEventRecord(e1); cudaEventSynchronize(e1);
  float ms; cudaEventElapsedTime(&ms, e0, e1); ms /= 20;
  printf("%-28s %d/SM: %7.3f ms %.3f TB/s  %s\n", name, per_sm, ms, 2.0 * bytes / ms / 1e9, cudaGetErrorString(cudaGetLastError()));
}
int main() {
  size_t bytes = 28672ull * 8192 * 14;
  char *a, *b; cudaMalloc(&a, bytes); cudaMalloc(&b, bytes);
  cudaMemset(a, 1, bytes); cudaMemset(b, 0, bytes);
  int sms; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  run<4, 16384>("bulk 4 x 16 KB", a, b, bytes, 1, sms);
  run<4, 16384>("bulk 4 x 16 KB", a, b, bytes, 2, sms);
  run<4, 32768>("bulk 4 x 32 KB", a, b, bytes, 1, sms);
  run<6, 32768>("bulk 6 x 32 KB", a, b, bytes, 1, sms);
  run<8, 16384>("bulk 8 x 16 KB", a, b, bytes, 1, sms);
  run<8, 8192>("bulk 8 x 8 KB", a, b, bytes, 2, sms);
  run<4, 8192>("bulk 4 x 8 KB", a, b, bytes, 4, sms);
  run<3, 65536>("bulk 3 x 64 KB", a, b, bytes, 1, sms);
  // check
  char* h = (char*)malloc(1 << 20); cudaMemcpy(h, b + bytes - (1 << 20), 1 << 20, cudaMemcpyDeviceToHost);
  int bad = 0; for (int i = 0; i < (1 << 20); i++) bad += h[i] != 1; printf("bad bytes at the end: %d\n", bad);
  cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
  cudaEventRecord(e0);
  for (int r = 0; r < 20; r++) cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice);
  cudaEventRecord(e1); cudaEventSynchronize(e1);
  float ms; cudaEventElapsedTime(&ms, e0, e1); ms /= 20;
  printf("cudaMemcpy: %.3f ms %.3f TB/s\n", ms, 2.0 * bytes / ms / 1e9);
}
