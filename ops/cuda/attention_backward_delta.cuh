// Attention backward, step 1: delta[b, h, i] = sum_d dout[b, i, h, d] * out[b, i, h, d] in f32,
// one warp per row with a fixed (butterfly) reduction order. Private to attention_backward.cu.
#pragma once

#include <cstdint>

#include "ops/cuda/attention_common.cuh"

namespace tandem::ops::cuda::attn {

inline constexpr int kDeltaRowsPerBlock = 8;  // one warp per (b, i, h) row

// delta [B, Hq, T]; out and dout [B, T, Hq, D] with token stride o_stride. Rows are taken in
// memory order (r = (b * T + i) * Hq + h) so a block reads contiguous heads.
template <int kD>
__global__ void __launch_bounds__(kDeltaRowsPerBlock * 32)
    AttentionDeltaKernel(float* delta, const bf16* out, const bf16* dout, int64_t o_stride,
                         int seq, int q_heads, int64_t rows) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kDeltaRowsPerBlock + (threadIdx.x >> 5);
  if (r >= rows) return;
  const int lane = threadIdx.x & 31;
  const int h = static_cast<int>(r % q_heads);
  const int64_t token = r / q_heads;  // b * T + i
  const bf16* o = out + token * o_stride + static_cast<int64_t>(h) * kD;
  const bf16* d = dout + token * o_stride + static_cast<int64_t>(h) * kD;
  float sum = 0.f;
#pragma unroll
  for (int c = 2 * lane; c < kD; c += 64) {
    const float2 of = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(o + c));
    const float2 df = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(d + c));
    sum += of.x * df.x + of.y * df.y;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  }
  if (lane == 0) {
    const int64_t b = token / seq;
    const int64_t i = token % seq;
    delta[(b * q_heads + h) * seq + i] = sum;
  }
}

}  // namespace tandem::ops::cuda::attn
