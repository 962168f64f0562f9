#include "ops/context.h"

#include "core/cuda_allocator.h"
#include "ops/internal/cuda_resources.h"

namespace tandem::ops {

#ifdef TANDEM_WITH_CUDA
internal::CudaResources::~CudaResources() {
  // Explicit order: drain the stream, free the cuBLASLt state, destroy the stream. No NCCL here
  // (STYLE rule 4).
  if (stream != nullptr) {
    cudaSetDevice(device_index);
    cudaStreamSynchronize(stream);
  }
  gemm.reset();
  for (cudaEvent_t e : marks) cudaEventDestroy(e);
  if (stream != nullptr) cudaStreamDestroy(stream);
}
#endif

Context::~Context() {
  // Resources that enqueue work go first; the allocator (which tensors may still reference
  // through this context's owner) goes last.
  cuda_.reset();
}

std::unique_ptr<Context> Context::Cpu() {
  std::unique_ptr<Context> ctx(new Context());
  ctx->device_ = Device::Cpu();
  ctx->allocator_ = &HostAllocator();
  return ctx;
}

StatusOr<std::unique_ptr<Context>> Context::Cuda(int device_index, StreamPriority priority) {
#ifdef TANDEM_WITH_CUDA
  const int count = CudaDeviceCount();
  if (device_index < 0 || device_index >= count) {
    return UnavailableError(StrCat("cuda:", device_index, " requested but ", count, " CUDA device(s) are visible"));
  }
  cudaError_t err = cudaSetDevice(device_index);
  if (err != cudaSuccess) return InternalError(StrCat("cudaSetDevice(", device_index, "): ", cudaGetErrorString(err)));
  std::unique_ptr<Context> ctx(new Context());
  ctx->device_ = Device::Cuda(device_index);
  TANDEM_ASSIGN_OR_RETURN(std::unique_ptr<CachingAllocator> alloc, CreateCudaCachingAllocator(device_index));
  ctx->owned_allocator_ = std::move(alloc);
  ctx->allocator_ = ctx->owned_allocator_.get();
  ctx->cuda_ = std::make_unique<internal::CudaResources>();
  ctx->cuda_->device_index = device_index;
  err = cudaDeviceGetAttribute(&ctx->cuda_->sm_count, cudaDevAttrMultiProcessorCount, device_index);
  if (err != cudaSuccess) return InternalError(StrCat("cudaDeviceGetAttribute: ", cudaGetErrorString(err)));
  int least = 0, greatest = 0;  // numerically: greatest <= least, and 0 is the default
  err = cudaDeviceGetStreamPriorityRange(&least, &greatest);
  if (err != cudaSuccess)
    return InternalError(StrCat("cudaDeviceGetStreamPriorityRange: ", cudaGetErrorString(err)));
  err = cudaStreamCreateWithPriority(&ctx->cuda_->stream, cudaStreamNonBlocking,
                                     priority == StreamPriority::kHigh ? greatest : least);
  if (err != cudaSuccess) return InternalError(StrCat("cudaStreamCreate: ", cudaGetErrorString(err)));
  std::string error;
  cuda::GemmState* gemm = cuda::CreateGemmState(&error);
  if (gemm == nullptr) return InternalError(StrCat("cuBLASLt setup on cuda:", device_index, ": ", error));
  ctx->cuda_->gemm = {gemm, &cuda::DestroyGemmState};
  return ctx;
#else
  (void)priority;
  return UnimplementedError(StrCat("ops::Context::Cuda(", device_index, "): this build has no CUDA support"));
#endif
}

StatusOr<std::unique_ptr<Context>> Context::ForDevice(Device device, StreamPriority priority) {
  if (device.is_cpu()) return Cpu();
  return Cuda(device.index, priority);
}

CudaStream Context::stream() const {
#ifdef TANDEM_WITH_CUDA
  return cuda_ ? reinterpret_cast<CudaStream>(cuda_->stream) : nullptr;
#else
  return nullptr;
#endif
}

Status Context::Synchronize() {
#ifdef TANDEM_WITH_CUDA
  if (cuda_) {
    cudaError_t err = cudaStreamSynchronize(cuda_->stream);
    if (err != cudaSuccess) {
      return InternalError(StrCat("cudaStreamSynchronize on ", device_.ToString(), ": ", cudaGetErrorString(err)));
    }
  }
#endif
  return Status::Ok();
}

Status Context::Pace(int depth) {
  if (depth < 1) return InvalidArgumentError(StrCat("Context::Pace: depth ", depth, " < 1"));
#ifdef TANDEM_WITH_CUDA
  if (cuda_) {
    internal::CudaResources& c = *cuda_;
    if (c.marks.size() != static_cast<size_t>(depth)) {  // a new depth: the old marks are waited
      TANDEM_RETURN_IF_ERROR(Synchronize());
      for (cudaEvent_t e : c.marks) cudaEventDestroy(e);
      c.marks.assign(static_cast<size_t>(depth), nullptr);
      c.marks_made = 0;
      for (cudaEvent_t& e : c.marks) {
        cudaError_t err = cudaEventCreateWithFlags(&e, cudaEventDisableTiming);
        if (err != cudaSuccess)
          return InternalError(StrCat("cudaEventCreate: ", cudaGetErrorString(err)));
      }
    }
    // The slot's previous mark is `depth` marks old: once it is done, at most depth - 1 older
    // marks are pending, and this one makes depth.
    cudaEvent_t e = c.marks[c.marks_made % c.marks.size()];
    if (c.marks_made >= c.marks.size()) {
      cudaError_t err = cudaEventSynchronize(e);
      if (err != cudaSuccess)
        return InternalError(
            StrCat("cudaEventSynchronize on ", device_.ToString(), ": ", cudaGetErrorString(err)));
    }
    cudaError_t err = cudaEventRecord(e, c.stream);
    if (err != cudaSuccess)
      return InternalError(StrCat("cudaEventRecord: ", cudaGetErrorString(err)));
    ++c.marks_made;
  }
#endif
  return Status::Ok();
}

}  // namespace tandem::ops
