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
  int device_index = 0;
  int sm_count = 1;  // streaming multiprocessors of the device (sizes grids of split kernels)
  cudaStream_t stream = nullptr;
  std::unique_ptr<cuda::GemmState, void (*)(cuda::GemmState*)> gemm{nullptr, nullptr};
  std::vector<cudaEvent_t> marks;  // Context::Pace's ring, one event per allowed mark
  uint64_t marks_made = 0;
  ~CudaResources();
};

}  // namespace tandem::ops::internal
#else
namespace tandem::ops::internal {
struct CudaResources {};  // CPU-only build: no CUDA state
}  // namespace tandem::ops::internal
#endif
