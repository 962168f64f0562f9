// Rotary position embedding, HF "rotate_half" convention (ops::Rope).
//
// Block per token; thread x owns frequency i (pairing element i with i + D/2) and computes the
// angle float(pos) * inv_freq[i] and its sine and cosine once (sincosf: the precise library
// function, not the __sinf intrinsic), then thread y walks the heads. Each thread reads both
// elements of a pair before writing them, so y may be x (in place). When D/2 is a whole number
// of 16-byte packs and the rows are aligned, a token's sines and cosines go to shared memory
// once and each thread moves both halves of a (head, pack) in 16-byte loads and stores (same
// arithmetic).
#include "ops/cuda/common.cuh"
#include "ops/internal/cuda_kernels.h"

namespace tandem::ops::cuda {
namespace {

template <typename T>
__global__ void RopeKernel(T* y, int64_t y_token_stride, const T* x, int64_t x_token_stride,
                           const int32_t* positions, const float* inv_freq, int64_t tokens,
                           int64_t heads, int64_t half, bool inverse) {
  for (int64_t n = blockIdx.x; n < tokens; n += gridDim.x) {
    const float pos = static_cast<float>(positions[n]);
    const T* xn = x + n * x_token_stride;
    T* yn = y + n * y_token_stride;
    for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
      const float angle = pos * inv_freq[i];
      float sin_a, cos_a;
      sincosf(angle, &sin_a, &cos_a);
      if (inverse) sin_a = -sin_a;
      for (int64_t h = threadIdx.y; h < heads; h += blockDim.y) {
        const int64_t lo = h * 2 * half + i;
        float y1, y2;
        RotatePair(ToFloat(xn[lo]), ToFloat(xn[lo + half]), cos_a, sin_a, y1, y2);
        yn[lo] = FromFloat<T>(y1);
        yn[lo + half] = FromFloat<T>(y2);
      }
    }
  }
}

// Block per token: the first D/2 threads put the token's cosines and sines in shared memory
// (sin_cos [2][D/2]), then thread t takes (head, pack) items t, t + blockDim.x, ...
template <typename T, int V>
__global__ void RopePackKernel(T* y, int64_t y_token_stride, const T* x, int64_t x_token_stride,
                               const int32_t* positions, const float* inv_freq, int64_t tokens,
                               int64_t heads, int64_t half, bool inverse) {
  extern __shared__ float sin_cos[];
  float* cos_s = sin_cos;
  float* sin_s = sin_cos + half;
  const int64_t packs = half / V;  // a head's packs per half
  const int64_t items = heads * packs;
  for (int64_t n = blockIdx.x; n < tokens; n += gridDim.x) {
    const float pos = static_cast<float>(positions[n]);
    for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
      float sin_a, cos_a;
      sincosf(pos * inv_freq[i], &sin_a, &cos_a);
      cos_s[i] = cos_a;
      sin_s[i] = inverse ? -sin_a : sin_a;
    }
    __syncthreads();
    const T* xn = x + n * x_token_stride;
    T* yn = y + n * y_token_stride;
    for (int64_t it = threadIdx.x; it < items; it += blockDim.x) {
      const int64_t h = it / packs, i0 = (it - h * packs) * V;
      const int64_t lo = h * 2 * half + i0;
      const Pack<T, V> p1 = LoadPack<T, V>(xn + lo);
      const Pack<T, V> p2 = LoadPack<T, V>(xn + lo + half);
      Pack<T, V> o1, o2;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float y1, y2;
        RotatePair(ToFloat(p1.v[j]), ToFloat(p2.v[j]), cos_s[i0 + j], sin_s[i0 + j], y1, y2);
        o1.v[j] = FromFloat<T>(y1);
        o2.v[j] = FromFloat<T>(y2);
      }
      StorePack<T, V>(yn + lo, o1);
      StorePack<T, V>(yn + lo + half, o2);
    }
    __syncthreads();  // the next token overwrites sin_cos
  }
}

}  // namespace

cudaError_t Rope(cudaStream_t stream, DType dtype, void* y, int64_t y_token_stride, const void* x,
                 int64_t x_token_stride, const int32_t* positions, const float* inv_freq,
                 int64_t tokens, int64_t heads, int64_t head_dim, bool inverse) {
  return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if (head_dim % 2 != 0) return cudaErrorInvalidValue;
    if (tokens <= 0 || heads <= 0 || head_dim <= 0) return cudaSuccess;
    const int64_t half = head_dim / 2;
    constexpr int kV = kVec16<T>;
    if (RowsVectorizable<T>(half, {y, x}, {y_token_stride, x_token_stride})) {  // half % kV == 0
      const int threads = ThreadsFor(heads * (half / kV), 256);
      const size_t smem = 2 * static_cast<size_t>(half) * sizeof(float);
      if (smem <= 48 * 1024) {
        RopePackKernel<T, kV><<<RowGrid(tokens), threads, smem, stream>>>(
            static_cast<T*>(y), y_token_stride, static_cast<const T*>(x), x_token_stride, positions,
            inv_freq, tokens, heads, half, inverse);
        return cudaGetLastError();
      }
    }
    const int bx = ThreadsFor(half, 128);
    const int by = static_cast<int>(std::clamp<int64_t>(256 / bx, 1, heads));
    RopeKernel<T><<<RowGrid(tokens), dim3(bx, by), 0, stream>>>(
        static_cast<T*>(y), y_token_stride, static_cast<const T*>(x), x_token_stride, positions,
        inv_freq, tokens, heads, half, inverse);
    return cudaGetLastError();
  });
}

}  // namespace tandem::ops::cuda
