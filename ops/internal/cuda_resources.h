// Per-context CUDA state: the stream, the cuBLASLt state and a scratch helper.
#pragma once

#ifdef TANDEM_WITH_CUDA
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "ops/internal/cuda_kernels.h"

namespace tandem::ops::internal {

struct CudaResources {
  // One stream the context may enqueue on, with Context::Pace's ring (one event per allowed
  // mark) and the event that hands the context's sequence over to the other stream. Events are
  // created in their stream's (green) context.
  struct Lane {
    cudaStream_t stream = nullptr;
    std::vector<cudaEvent_t> marks;
    uint64_t marks_made = 0;
    cudaEvent_t handoff = nullptr;
  };
  int device_index = 0;
  // Streaming multiprocessors of the device (sizes grids of split kernels). It stays the
  // device's count inside an SM partition, so results do not depend on where they ran.
  int sm_count = 1;
  cudaStream_t stream = nullptr;  // where ops enqueue: whole.stream or partition.stream
  std::unique_ptr<cuda::GemmState, void (*)(cuda::GemmState*)> gemm{nullptr, nullptr};
  Lane whole;                 // the stream on the whole device
  Lane partition;             // Context::CreateSmPartition's stream (null stream without one)
  void* green_ctx = nullptr;  // CUgreenCtx of the partition
  void* partition_context = nullptr;  // its CUcontext (current while its events are created)
  int partition_sms = 0;
  Lane& current() { return stream == whole.stream ? whole : partition; }
  ~CudaResources();
};

}  // namespace tandem::ops::internal
#else
namespace tandem::ops::internal {
struct CudaResources {};  // CPU-only build: no CUDA state
}  // namespace tandem::ops::internal
#endif
