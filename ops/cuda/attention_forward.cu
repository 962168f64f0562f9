// Fused causal grouped-query attention, forward: the launcher behind ops::AttentionForward
// (kernel and scheme in attention_forward_kernel.cuh).
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstdint>

#include "ops/cuda/attention_common.cuh"
#include "ops/cuda/attention_forward_kernel.cuh"
#include "ops/cuda/attention_sm90a.h"
#include "ops/internal/cuda_kernels.h"

namespace tandem::ops::cuda {
namespace attn {
namespace {

constexpr int kMaxDevices = 64;

template <int kD, int kWarps, int kMT, int kBN>
cudaError_t LaunchForward(cudaStream_t stream, const FwdParams& p, int64_t batch) {
  using Tr = FwdTraits<kD, kWarps, kMT, kBN>;
  const int64_t num_qtiles = CeilDiv(p.seq, Tr::kBM);
  if (num_qtiles > 65535 || batch * p.q_heads > 0x7fffffff) return cudaErrorInvalidConfiguration;
  auto* kernel = AttentionForwardKernel<kD, kWarps, kMT, kBN>;
  const cudaError_t err = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(Tr::kSmemBytes));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(batch * p.q_heads), static_cast<unsigned>(num_qtiles));
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

bool DeviceRunsSm90a() {
  // One answer per device, asked once (cudaGetDevice is cheap; the attribute queries are not).
  static std::atomic<int> cached[kMaxDevices];  // 0 unknown, 1 yes, 2 no
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (device < 0 || device >= kMaxDevices) return false;
  int v = cached[device].load(std::memory_order_relaxed);
  if (v == 0) {
    int major = 0, minor = 0;
    const bool ok =
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess;
    v = ok && major == 9 && minor == 0 ? 1 : 2;
    cached[device].store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

}  // namespace attn

cudaError_t AttentionForward(cudaStream_t stream, const AttentionShape& s, void* out, float* lse,
                             const void* q, const void* k, const void* v, float scale,
                             const int32_t* segment_ids) {
  if (s.batch == 0 || s.seq == 0 || s.q_heads == 0) return cudaSuccess;
  if (s.kv_heads <= 0 || s.q_heads % s.kv_heads != 0 || s.seq > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  attn::FwdParams p;
  p.out = static_cast<attn::bf16*>(out);
  p.lse = lse;
  p.q = static_cast<const attn::bf16*>(q);
  p.k = static_cast<const attn::bf16*>(k);
  p.v = static_cast<const attn::bf16*>(v);
  p.seg = segment_ids;
  p.q_stride = s.q_stride;
  p.k_stride = s.k_stride;
  p.v_stride = s.v_stride;
  p.o_stride = s.o_stride;
  p.seq = static_cast<int>(s.seq);
  p.q_heads = static_cast<int>(s.q_heads);
  p.group = static_cast<int>(s.q_heads / s.kv_heads);
  p.causal = s.causal;
  p.scale_log2 = scale * attn::kLog2e;
  if (s.allow_sm90 && attn::DeviceRunsSm90a()) {
    return attn::AttentionForwardSm90(stream, p, s.batch, static_cast<int>(s.head_dim));
  }
  // 128 query rows x 64 keys per block. D = 64: 4 warps of 32 rows (each K/V fragment loaded
  // from shared memory feeds two row tiles). D = 128: 8 warps of 16 rows, which keeps the
  // accumulators (O 64 + S 32 f32 per lane) far from the register limit.
  switch (s.head_dim) {
    case 64:
      return attn::LaunchForward<64, 4, 2, 64>(stream, p, s.batch);
    case 128:
      return attn::LaunchForward<128, 8, 1, 64>(stream, p, s.batch);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace tandem::ops::cuda
