#include "ops/context.h"

#include "core/cuda_allocator.h"
#include "ops/internal/cuda_resources.h"

#ifdef TANDEM_WITH_CUDA
#include <cuda.h>
#include <cudaTypedefs.h>
#endif

namespace tandem::ops {

#ifdef TANDEM_WITH_CUDA
namespace {

// The driver's green-context entry points, looked up through the runtime (no link to libcuda;
// a driver without them leaves `ok` false).
struct GreenApi {
  PFN_cuDeviceGetDevResource_v12040 get_resource = nullptr;
  PFN_cuDevSmResourceSplitByCount_v12040 split = nullptr;
  PFN_cuDevResourceGenerateDesc_v12040 describe = nullptr;
  PFN_cuGreenCtxCreate_v12040 create = nullptr;
  PFN_cuGreenCtxDestroy_v12040 destroy = nullptr;
  PFN_cuCtxFromGreenCtx_v12040 as_context = nullptr;
  PFN_cuGreenCtxStreamCreate_v12050 create_stream = nullptr;
  PFN_cuCtxPushCurrent_v4000 push = nullptr;
  PFN_cuCtxPopCurrent_v4000 pop = nullptr;
  PFN_cuEventCreate_v2000 create_event = nullptr;
  PFN_cuGetErrorString_v6000 error_string = nullptr;
  bool ok = false;
  std::string missing;
};

template <typename Fn>
void Lookup(const char* name, unsigned version, Fn* fn, GreenApi& api) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  if (cudaGetDriverEntryPointByVersion(name, &p, version, cudaEnableDefault, &found) !=
          cudaSuccess ||
      found != cudaDriverEntryPointSuccess || p == nullptr) {
    if (api.missing.empty()) api.missing = name;
    return;
  }
  *fn = reinterpret_cast<Fn>(p);
}

const GreenApi& Green() {
  static const GreenApi api = [] {
    GreenApi a;
    Lookup("cuDeviceGetDevResource", 12040, &a.get_resource, a);
    Lookup("cuDevSmResourceSplitByCount", 12040, &a.split, a);
    Lookup("cuDevResourceGenerateDesc", 12040, &a.describe, a);
    Lookup("cuGreenCtxCreate", 12040, &a.create, a);
    Lookup("cuGreenCtxDestroy", 12040, &a.destroy, a);
    Lookup("cuCtxFromGreenCtx", 12040, &a.as_context, a);
    Lookup("cuGreenCtxStreamCreate", 12050, &a.create_stream, a);
    Lookup("cuCtxPushCurrent", 4000, &a.push, a);
    Lookup("cuCtxPopCurrent", 4000, &a.pop, a);
    Lookup("cuEventCreate", 2000, &a.create_event, a);
    Lookup("cuGetErrorString", 6000, &a.error_string, a);
    a.ok = a.missing.empty();
    return a;
  }();
  return api;
}

std::string DriverError(CUresult r) {
  const char* text = nullptr;
  if (Green().error_string != nullptr) Green().error_string(r, &text);
  return text != nullptr ? std::string(text) : StrCat("CUresult ", static_cast<int>(r));
}

void DestroyLane(internal::CudaResources::Lane& lane) {
  for (cudaEvent_t e : lane.marks) cudaEventDestroy(e);
  lane.marks.clear();
  if (lane.handoff != nullptr) cudaEventDestroy(lane.handoff);
  lane.handoff = nullptr;
  if (lane.stream != nullptr) cudaStreamDestroy(lane.stream);
  lane.stream = nullptr;
}

// An event made in the lane's own context (the partition's green context when `context` is not
// null): an event is recorded only on streams of the context it was created in.
Status CreateLaneEvent(void* context, cudaEvent_t* event) {
  if (context == nullptr) {
    const cudaError_t err = cudaEventCreateWithFlags(event, cudaEventDisableTiming);
    if (err != cudaSuccess)
      return InternalError(StrCat("cudaEventCreate: ", cudaGetErrorString(err)));
    return Status::Ok();
  }
  const GreenApi& g = Green();
  CUresult r = g.push(static_cast<CUcontext>(context));
  if (r != CUDA_SUCCESS) return InternalError(StrCat("cuCtxPushCurrent: ", DriverError(r)));
  CUevent e = nullptr;
  r = g.create_event(&e, CU_EVENT_DISABLE_TIMING);
  CUcontext popped = nullptr;
  g.pop(&popped);
  if (r != CUDA_SUCCESS)
    return InternalError(StrCat("cuEventCreate in the SM partition: ", DriverError(r)));
  *event = reinterpret_cast<cudaEvent_t>(e);
  return Status::Ok();
}

}  // namespace

internal::CudaResources::~CudaResources() {
  // Explicit order: drain the streams, free the cuBLASLt state, destroy the streams and the
  // green context. No NCCL here (STYLE rule 4).
  cudaSetDevice(device_index);
  if (whole.stream != nullptr) cudaStreamSynchronize(whole.stream);
  if (partition.stream != nullptr) cudaStreamSynchronize(partition.stream);
  gemm.reset();
  DestroyLane(whole);
  DestroyLane(partition);
  if (green_ctx != nullptr) Green().destroy(static_cast<CUgreenCtx>(green_ctx));
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
  ctx->priority_ = priority == StreamPriority::kHigh ? greatest : least;
  err = cudaStreamCreateWithPriority(&ctx->cuda_->whole.stream, cudaStreamNonBlocking,
                                     ctx->priority_);
  if (err != cudaSuccess) return InternalError(StrCat("cudaStreamCreate: ", cudaGetErrorString(err)));
  ctx->cuda_->stream = ctx->cuda_->whole.stream;
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
    // Each stream keeps its own ring; after a switch the other stream's marks are older than
    // every new one (the handoff orders them), so waiting on this ring waits for them too.
    internal::CudaResources::Lane& c = cuda_->current();
    if (c.marks.size() != static_cast<size_t>(depth)) {  // a new depth: the old marks are waited
      TANDEM_RETURN_IF_ERROR(Synchronize());
      for (cudaEvent_t e : c.marks) cudaEventDestroy(e);
      c.marks.assign(static_cast<size_t>(depth), nullptr);
      c.marks_made = 0;
      void* in = &c == &cuda_->partition ? cuda_->partition_context : nullptr;
      for (cudaEvent_t& e : c.marks) TANDEM_RETURN_IF_ERROR(CreateLaneEvent(in, &e));
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

StatusOr<int> Context::CreateSmPartition(int sms) {
  if (!is_cuda()) {
    return FailedPreconditionError(
        "Context::CreateSmPartition: a CPU context has no SMs to partition");
  }
#ifdef TANDEM_WITH_CUDA
  internal::CudaResources& c = *cuda_;
  if (c.green_ctx != nullptr) {
    return FailedPreconditionError(StrCat("Context::CreateSmPartition: ", device_.ToString(),
                                          " already has a partition of ", c.partition_sms, " SMs"));
  }
  if (sms < 1 || sms >= c.sm_count) {
    return InvalidArgumentError(StrCat("Context::CreateSmPartition: ", sms, " SMs on ",
                                       device_.ToString(), ", which has ", c.sm_count, " (1 to ",
                                       c.sm_count - 1, " can be set apart)"));
  }
  const GreenApi& g = Green();
  if (!g.ok) {
    return UnavailableError(
        StrCat("SM partitions need CUDA green contexts (driver 12.5 or later); "
               "this driver lacks ",
               g.missing));
  }
  cudaError_t err = cudaSetDevice(c.device_index);
  if (err != cudaSuccess) return InternalError(StrCat("cudaSetDevice: ", cudaGetErrorString(err)));
  err = cudaFree(nullptr);  // the primary context exists before a green one retains it
  if (err != cudaSuccess)
    return InternalError(StrCat("cudaFree(nullptr): ", cudaGetErrorString(err)));
  const auto fail = [&](const char* what, CUresult r) {
    return UnavailableError(StrCat("SM partition of ", sms, " on ", device_.ToString(), ": ", what,
                                   ": ", DriverError(r)));
  };
  CUdevResource whole{};
  CUresult r =
      g.get_resource(static_cast<CUdevice>(c.device_index), &whole, CU_DEV_RESOURCE_TYPE_SM);
  if (r != CUDA_SUCCESS) return fail("cuDeviceGetDevResource", r);
  CUdevResource part{}, rest{};
  unsigned groups = 1;
  r = g.split(&part, &groups, &whole, &rest, 0, static_cast<unsigned>(sms));
  if (r != CUDA_SUCCESS) return fail("cuDevSmResourceSplitByCount", r);
  if (groups != 1)
    return fail("cuDevSmResourceSplitByCount made no group", CUDA_ERROR_INVALID_VALUE);
  CUdevResourceDesc desc = nullptr;
  r = g.describe(&desc, &part, 1);
  if (r != CUDA_SUCCESS) return fail("cuDevResourceGenerateDesc", r);
  CUgreenCtx green = nullptr;
  r = g.create(&green, desc, static_cast<CUdevice>(c.device_index), CU_GREEN_CTX_DEFAULT_STREAM);
  if (r != CUDA_SUCCESS) return fail("cuGreenCtxCreate", r);
  c.green_ctx = green;
  CUcontext as_context = nullptr;
  r = g.as_context(&as_context, green);
  if (r != CUDA_SUCCESS) return fail("cuCtxFromGreenCtx", r);
  c.partition_context = as_context;
  CUstream stream = nullptr;
  r = g.create_stream(&stream, green, CU_STREAM_NON_BLOCKING, priority_);
  if (r != CUDA_SUCCESS) return fail("cuGreenCtxStreamCreate", r);
  c.partition.stream = reinterpret_cast<cudaStream_t>(stream);
  TANDEM_RETURN_IF_ERROR(CreateLaneEvent(nullptr, &c.whole.handoff));
  TANDEM_RETURN_IF_ERROR(CreateLaneEvent(c.partition_context, &c.partition.handoff));
  c.partition_sms = static_cast<int>(part.sm.smCount);
  return c.partition_sms;
#else
  (void)sms;
  return UnimplementedError("Context::CreateSmPartition: this build has no CUDA support");
#endif
}

Status Context::UseSmPartition(bool on) {
#ifdef TANDEM_WITH_CUDA
  if (on && (!cuda_ || cuda_->partition.stream == nullptr)) {
    return FailedPreconditionError(StrCat("Context::UseSmPartition: ", device_.ToString(),
                                          " has no SM partition (CreateSmPartition first)"));
  }
  if (!cuda_ || in_sm_partition() == on) return Status::Ok();
  internal::CudaResources& c = *cuda_;
  internal::CudaResources::Lane& from = c.current();
  internal::CudaResources::Lane& to = on ? c.partition : c.whole;
  cudaError_t err = cudaEventRecord(from.handoff, from.stream);
  if (err == cudaSuccess) err = cudaStreamWaitEvent(to.stream, from.handoff, 0);
  if (err != cudaSuccess) {
    return InternalError(StrCat("Context::UseSmPartition(", on, ") on ", device_.ToString(), ": ",
                                cudaGetErrorString(err)));
  }
  c.stream = to.stream;
  return Status::Ok();
#else
  if (on)
    return FailedPreconditionError("Context::UseSmPartition: a CPU context has no SM partition");
  return Status::Ok();
#endif
}

bool Context::in_sm_partition() const {
#ifdef TANDEM_WITH_CUDA
  return cuda_ && cuda_->partition.stream != nullptr && cuda_->stream == cuda_->partition.stream;
#else
  return false;
#endif
}

}  // namespace tandem::ops
