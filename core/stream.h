// Owners of CUDA streams and events: move-only RAII handles made by Create() functions that
// return StatusOr.
//
//   TANDEM_ASSIGN_OR_RETURN(CudaStreamOwner stream, CudaStreamOwner::Create(0));
//   TANDEM_ASSIGN_OR_RETURN(CudaEventOwner start, CudaEventOwner::Create(0));
//   TANDEM_ASSIGN_OR_RETURN(CudaEventOwner end, CudaEventOwner::Create(0));
//   TANDEM_RETURN_IF_ERROR(start.Record(stream.get()));
//   ...enqueue work on stream.get()...
//   TANDEM_RETURN_IF_ERROR(end.Record(stream.get()));
//   TANDEM_ASSIGN_OR_RETURN(float ms, CudaEventOwner::ElapsedMs(start, end));
//
// Streams are created non-blocking (they do not synchronize with the legacy default stream).
// The destructor destroys the handle without waiting (CUDA defers the release until queued work
// is done) and ignores errors, so it is safe at shutdown; call Synchronize() first where results
// are needed. In CPU-only builds Create() returns Unimplemented.
//
// Thread-safety: a handle is owned by one thread at a time; the CUDA calls themselves are
// thread-safe.
#pragma once

#include <cstddef>

#include "core/device.h"
#include "core/status.h"

namespace tandem {

class CudaEventOwner;

class CudaStreamOwner {
 public:
  // A new non-blocking stream on `device`. Unavailable if the device does not exist.
  static StatusOr<CudaStreamOwner> Create(int device);

  CudaStreamOwner(CudaStreamOwner&& other) noexcept;
  CudaStreamOwner& operator=(CudaStreamOwner&& other) noexcept;
  CudaStreamOwner(const CudaStreamOwner&) = delete;
  CudaStreamOwner& operator=(const CudaStreamOwner&) = delete;
  ~CudaStreamOwner();

  CudaStream get() const { return stream_; }
  int device() const { return device_; }
  // Blocks until all work enqueued on the stream is done.
  Status Synchronize() const;
  // Makes later work on this stream wait for `event` (recorded on any stream); does not block
  // the host.
  Status Wait(const CudaEventOwner& event) const;

 private:
  CudaStreamOwner(CudaStream stream, int device) : stream_(stream), device_(device) {}
  void Reset();
  CudaStream stream_ = nullptr;
  int device_ = -1;
};

class CudaEventOwner {
 public:
  // A new event on `device`; `timing` = false makes a lighter event that ElapsedMs rejects.
  static StatusOr<CudaEventOwner> Create(int device, bool timing = true);

  CudaEventOwner(CudaEventOwner&& other) noexcept;
  CudaEventOwner& operator=(CudaEventOwner&& other) noexcept;
  CudaEventOwner(const CudaEventOwner&) = delete;
  CudaEventOwner& operator=(const CudaEventOwner&) = delete;
  ~CudaEventOwner();

  CudaEvent get() const { return event_; }
  int device() const { return device_; }
  // Captures the work enqueued on `stream` so far (stream of this event's device).
  Status Record(CudaStream stream);
  // Makes later work on `stream` wait for this event; does not block the host.
  Status Wait(CudaStream stream) const;
  // Blocks the host until the recorded work is done.
  Status Synchronize() const;
  // Milliseconds between two recorded timing events of one device; waits for `end` to complete.
  static StatusOr<float> ElapsedMs(const CudaEventOwner& start, const CudaEventOwner& end);

 private:
  CudaEventOwner(CudaEvent event, int device) : event_(event), device_(device) {}
  void Reset();
  CudaEvent event_ = nullptr;
  int device_ = -1;
};

// Makes `device` the calling thread's current device. Worker threads that touch a device's
// streams or events call it first: a thread that never chose one uses device 0, and the runtime
// would create a context there. Unimplemented without CUDA.
Status UseDeviceOnThisThread(int device);

// Page-locks existing host memory (cudaHostRegister) so that copies between it and a device run
// asynchronously at full speed, e.g. a shared-memory region another process owns. Unregisters
// in the destructor (errors ignored). Create fails (Unavailable) without CUDA or a device; the
// memory must outlive the registration.
class HostRegistration {
 public:
  static StatusOr<HostRegistration> Create(void* data, size_t num_bytes);
  HostRegistration() = default;
  HostRegistration(HostRegistration&& other) noexcept;
  HostRegistration& operator=(HostRegistration&& other) noexcept;
  HostRegistration(const HostRegistration&) = delete;
  HostRegistration& operator=(const HostRegistration&) = delete;
  ~HostRegistration();

  void* data() const { return data_; }

 private:
  explicit HostRegistration(void* data) : data_(data) {}
  void Reset();
  void* data_ = nullptr;
};

}  // namespace tandem
