// Merge of a block's partial attention result into a running one (ops::AttentionMerge), in f32:
// one warp per row (b, t, h); lanes stride over D. Each element has one writer and no reduction
// crosses lanes, so the result is deterministic.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ops/internal/cuda_kernels.h"

namespace tandem::ops::cuda {
namespace {

constexpr int kMergeRowsPerBlock = 8;

__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }

// Rows r = (b * T + t) * H + h in memory order of out; lse index (b * H + h) * T + t.
template <typename T>
__global__ void __launch_bounds__(kMergeRowsPerBlock * 32)
    AttentionMergeKernel(float* out_acc, float* lse_acc, const T* out_blk, const float* lse_blk,
                         int64_t rows, int64_t seq, int64_t heads, int64_t head_dim) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kMergeRowsPerBlock + (threadIdx.x >> 5);
  if (r >= rows) return;
  const int lane = threadIdx.x & 31;
  const int64_t h = r % heads;
  const int64_t token = r / heads;  // b * T + t
  const int64_t b = token / seq;
  const int64_t t = token % seq;
  const int64_t li = (b * heads + h) * seq + t;
  const float la = lse_acc[li];
  const float lb = lse_blk[li];
  float wa = 1.f, wb = 0.f, l = la;  // also the case lb == -inf
  if (la == -INFINITY) {
    wa = 0.f;
    wb = lb == -INFINITY ? 0.f : 1.f;
    l = lb;
  } else if (lb != -INFINITY) {
    const float hi = fmaxf(la, lb);
    const float lo = fminf(la, lb);
    l = hi + log1pf(expf(lo - hi));
    wa = expf(la - l);
    wb = expf(lb - l);
  }
  float* o = out_acc + r * head_dim;
  const T* ob = out_blk + r * head_dim;
  for (int64_t d = lane; d < head_dim; d += 32) o[d] = wa * o[d] + wb * ToFloat(ob[d]);
  __syncwarp();  // every lane has read lse_acc[li] before it is replaced
  if (lane == 0) lse_acc[li] = l;
}

}  // namespace

cudaError_t AttentionMerge(cudaStream_t stream, DType blk_dtype, float* out_acc, float* lse_acc,
                           const void* out_blk, const float* lse_blk, int64_t batch, int64_t seq,
                           int64_t heads, int64_t head_dim) {
  const int64_t rows = batch * seq * heads;
  if (rows == 0 || head_dim == 0) return cudaSuccess;
  const int64_t blocks = (rows + kMergeRowsPerBlock - 1) / kMergeRowsPerBlock;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks));
  const unsigned threads = kMergeRowsPerBlock * 32;
  switch (blk_dtype) {
    case DType::kF32:
      AttentionMergeKernel<float>
          <<<grid, threads, 0, stream>>>(out_acc, lse_acc, static_cast<const float*>(out_blk),
                                         lse_blk, rows, seq, heads, head_dim);
      break;
    case DType::kBF16:
      AttentionMergeKernel<__nv_bfloat16><<<grid, threads, 0, stream>>>(
          out_acc, lse_acc, static_cast<const __nv_bfloat16*>(out_blk), lse_blk, rows, seq, heads,
          head_dim);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace tandem::ops::cuda
