// ops::Context: the device, allocator and stream every op runs with.
//
// A CPU context computes in f32 on the host with the reference implementations. A CUDA context
// owns one stream, a cuBLASLt handle with its workspace and a caching allocator for one device;
// ops enqueue work on its stream and return without waiting. Nothing here is global: two contexts
// (two devices, or a CPU one beside a CUDA one in a parity test) live side by side.
//
//   auto ctx = ops::Context::Cpu();
//   TANDEM_ASSIGN_OR_RETURN(auto gpu, ops::Context::Cuda(0));
//
// Thread-safety: a Context is used by one thread at a time.
#pragma once

#include <memory>

#include "core/allocator.h"
#include "core/device.h"
#include "core/status.h"

namespace tandem::ops {

// Priority of a CUDA context's stream. When two contexts share a device, the GPU schedules the
// waiting thread blocks of a kHigh stream before those of a kNormal one (blocks already running
// are not preempted). The serving engine runs inference at kHigh and fine-tuning at kNormal.
enum class StreamPriority : uint8_t { kNormal, kHigh };

namespace internal {
struct CudaResources;  // stream, cuBLASLt handle, workspace; see ops/internal/cuda_resources.h
}
class Profiler;  // ops/profiler.h

class Context {
 public:
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  static std::unique_ptr<Context> Cpu();
  // Unimplemented in CPU-only builds; Unavailable when the device does not exist.
  static StatusOr<std::unique_ptr<Context>> Cuda(int device_index,
                                                 StreamPriority priority = StreamPriority::kNormal);
  // Cpu() or Cuda(device.index, priority).
  static StatusOr<std::unique_ptr<Context>> ForDevice(
      Device device, StreamPriority priority = StreamPriority::kNormal);

  Device device() const { return device_; }
  bool is_cuda() const { return device_.is_cuda(); }
  // Allocator for tensors on this context's device (HostAllocator() for CPU).
  Allocator& allocator() { return *allocator_; }
  // Makes allocator() return `allocator` (not owned; it must outlive every use through this
  // context) and returns the one it replaces. CudaGraph routes a capture's allocations into its
  // arena this way and puts the previous allocator back.
  Allocator* ExchangeAllocator(Allocator* allocator) {
    Allocator* previous = allocator_;
    allocator_ = allocator;
    return previous;
  }
  // The stream ops run on (nullptr for CPU).
  CudaStream stream() const;
  // Waits for all work enqueued on the stream. OK at once on CPU.
  Status Synchronize();
  // Marks the work enqueued so far and waits until at most `depth` (>= 1) of the marks made by
  // these calls are unfinished: a thread that enqueues work in pieces calls it after each piece
  // to keep the device busy with at most `depth` pieces queued ahead. OK at once on CPU.
  Status Pace(int depth);

  // An SM partition (CUDA green contexts, driver 12.5 or later): CreateSmPartition(n) makes a
  // second stream, at this context's priority, whose kernels run on `n` streaming
  // multiprocessors only (rounded up to the device's partition granularity) and returns the SM
  // count it got; UseSmPartition(true) sends what this context enqueues from then on to that
  // stream, (false) back to the whole device. A switch orders the two streams with an event, so
  // the context's work stays one sequence (Synchronize and Pace see both) and results do not
  // depend on where it ran. FailedPrecondition on a CPU context, Unavailable where the driver
  // or device has no green contexts, InvalidArgument for n outside [1, SMs - 1]; created once.
  // ops::WaitForStream and ops::Profiler make their events in the device's primary context, so
  // they are for a context while it is on the whole device (the serving engine uses neither on
  // its fine-tuning context).
  StatusOr<int> CreateSmPartition(int sms);
  Status UseSmPartition(bool on);
  bool in_sm_partition() const;

  internal::CudaResources* cuda() { return cuda_.get(); }

  // The profiler that times this context's ops (ops/profiler.h), or null (the default: each op
  // then pays one pointer test). Not owned; Profiler::Begin/End attach and detach it.
  Profiler* profiler() const { return profiler_; }
  void set_profiler(Profiler* profiler) { profiler_ = profiler; }

 private:
  Context() = default;
  Device device_;
  Allocator* allocator_ = nullptr;
  std::unique_ptr<Allocator> owned_allocator_;
  std::unique_ptr<internal::CudaResources> cuda_;
  int priority_ = 0;  // the CUDA stream priority of kNormal/kHigh on this device
  Profiler* profiler_ = nullptr;
};

}  // namespace tandem::ops
