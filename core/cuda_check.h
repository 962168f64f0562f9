// One check macro per foreign API, CUDA runtime here: each adds file, line and the failing
// expression to the error as it rises. Include only in CUDA builds (TANDEM_WITH_CUDA).
//
//   TANDEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(...));   // in a function returning Status(Or)
//   TANDEM_CUDA_CHECK(cudaStreamSynchronize(s));         // aborts: for invariants and tools
#pragma once

#include <cuda_runtime.h>

#include "core/status.h"

#define TANDEM_CUDA_RETURN_IF_ERROR(expr)                                                      \
  do {                                                                                         \
    const cudaError_t tandem_cuda_err_ = (expr);                                               \
    if (tandem_cuda_err_ != cudaSuccess) {                                                     \
      return ::tandem::InternalError(::tandem::StrCat(                                         \
          ::tandem::internal::SourceLocation(__FILE__, __LINE__), ": ", #expr, ": ",           \
          cudaGetErrorName(tandem_cuda_err_), " (", cudaGetErrorString(tandem_cuda_err_), ")")); \
    }                                                                                          \
  } while (0)

#define TANDEM_CUDA_CHECK(expr)                                                       \
  do {                                                                                \
    const cudaError_t tandem_cuda_err_ = (expr);                                      \
    if (tandem_cuda_err_ != cudaSuccess) {                                            \
      ::tandem::internal::CheckFailed(__FILE__, __LINE__, #expr,                      \
                                      cudaGetErrorString(tandem_cuda_err_));          \
    }                                                                                 \
  } while (0)
