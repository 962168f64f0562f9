#include "core/stream.h"

#include <utility>

#ifdef TANDEM_WITH_CUDA
#include "core/cuda_check.h"
#endif

namespace tandem {

#ifdef TANDEM_WITH_CUDA
namespace {

// cudaStream_t and CudaStream name the same type; the casts document the crossing.
cudaStream_t Native(CudaStream s) { return reinterpret_cast<cudaStream_t>(s); }
cudaEvent_t Native(CudaEvent e) { return reinterpret_cast<cudaEvent_t>(e); }

Status CheckDevice(const char* what, int device) {
  const int count = CudaDeviceCount();
  if (device < 0 || device >= count) {
    return UnavailableError(
        StrCat(what, ": cuda:", device, " requested but ", count, " CUDA device(s) are visible"));
  }
  return Status::Ok();
}

// Runs `fn` with `device` current, then restores the previous device.
template <class Fn>
Status OnDevice(int device, Fn fn) {
  int previous = -1;
  TANDEM_CUDA_RETURN_IF_ERROR(cudaGetDevice(&previous));
  if (previous != device) TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  const Status s = fn();
  if (previous != device) cudaSetDevice(previous);
  return s;
}

}  // namespace

StatusOr<CudaStreamOwner> CudaStreamOwner::Create(int device) {
  TANDEM_RETURN_IF_ERROR(CheckDevice("CudaStreamOwner::Create", device));
  cudaStream_t stream = nullptr;
  TANDEM_RETURN_IF_ERROR(OnDevice(device, [&]() -> Status {
    TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    return Status::Ok();
  }));
  return CudaStreamOwner(reinterpret_cast<CudaStream>(stream), device);
}

void CudaStreamOwner::Reset() {
  if (stream_ != nullptr) cudaStreamDestroy(Native(stream_));  // errors ignored (shutdown)
  stream_ = nullptr;
}

Status CudaStreamOwner::Synchronize() const {
  TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(Native(stream_)));
  return Status::Ok();
}

Status CudaStreamOwner::Wait(const CudaEventOwner& event) const {
  TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(Native(stream_), Native(event.get()), 0));
  return Status::Ok();
}

StatusOr<CudaEventOwner> CudaEventOwner::Create(int device, bool timing) {
  TANDEM_RETURN_IF_ERROR(CheckDevice("CudaEventOwner::Create", device));
  cudaEvent_t event = nullptr;
  TANDEM_RETURN_IF_ERROR(OnDevice(device, [&]() -> Status {
    TANDEM_CUDA_RETURN_IF_ERROR(
        cudaEventCreateWithFlags(&event, timing ? cudaEventDefault : cudaEventDisableTiming));
    return Status::Ok();
  }));
  return CudaEventOwner(reinterpret_cast<CudaEvent>(event), device);
}

void CudaEventOwner::Reset() {
  if (event_ != nullptr) cudaEventDestroy(Native(event_));  // errors ignored (shutdown)
  event_ = nullptr;
}

Status CudaEventOwner::Record(CudaStream stream) {
  TANDEM_CUDA_RETURN_IF_ERROR(cudaEventRecord(Native(event_), Native(stream)));
  return Status::Ok();
}

Status CudaEventOwner::Wait(CudaStream stream) const {
  TANDEM_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(Native(stream), Native(event_), 0));
  return Status::Ok();
}

Status CudaEventOwner::Synchronize() const {
  TANDEM_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(Native(event_)));
  return Status::Ok();
}

StatusOr<float> CudaEventOwner::ElapsedMs(const CudaEventOwner& start, const CudaEventOwner& end) {
  TANDEM_RETURN_IF_ERROR(end.Synchronize());
  float ms = 0;
  TANDEM_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, Native(start.event_), Native(end.event_)));
  return ms;
}

Status UseDeviceOnThisThread(int device) {
  TANDEM_RETURN_IF_ERROR(CheckDevice("UseDeviceOnThisThread", device));
  TANDEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  return Status::Ok();
}

StatusOr<HostRegistration> HostRegistration::Create(void* data, size_t num_bytes) {
  if (CudaDeviceCount() == 0) return UnavailableError("cudaHostRegister: no CUDA device is visible");
  TANDEM_CUDA_RETURN_IF_ERROR(cudaHostRegister(data, num_bytes, cudaHostRegisterPortable));
  return HostRegistration(data);
}
void HostRegistration::Reset() {
  if (data_ != nullptr) cudaHostUnregister(data_);
  data_ = nullptr;
}

#else  // !TANDEM_WITH_CUDA

Status UseDeviceOnThisThread(int) {
  return UnimplementedError("UseDeviceOnThisThread: this build has no CUDA support");
}

StatusOr<HostRegistration> HostRegistration::Create(void*, size_t) {
  return UnavailableError("cudaHostRegister: this build has no CUDA support");
}
void HostRegistration::Reset() { data_ = nullptr; }

StatusOr<CudaStreamOwner> CudaStreamOwner::Create(int device) {
  return UnimplementedError(
      StrCat("CudaStreamOwner::Create(", device, "): this build has no CUDA support"));
}
void CudaStreamOwner::Reset() { stream_ = nullptr; }
Status CudaStreamOwner::Synchronize() const {
  return UnimplementedError("CudaStreamOwner: this build has no CUDA support");
}
Status CudaStreamOwner::Wait(const CudaEventOwner&) const {
  return UnimplementedError("CudaStreamOwner: this build has no CUDA support");
}

StatusOr<CudaEventOwner> CudaEventOwner::Create(int device, bool) {
  return UnimplementedError(
      StrCat("CudaEventOwner::Create(", device, "): this build has no CUDA support"));
}
void CudaEventOwner::Reset() { event_ = nullptr; }
Status CudaEventOwner::Record(CudaStream) {
  return UnimplementedError("CudaEventOwner: this build has no CUDA support");
}
Status CudaEventOwner::Wait(CudaStream) const {
  return UnimplementedError("CudaEventOwner: this build has no CUDA support");
}
Status CudaEventOwner::Synchronize() const {
  return UnimplementedError("CudaEventOwner: this build has no CUDA support");
}
StatusOr<float> CudaEventOwner::ElapsedMs(const CudaEventOwner&, const CudaEventOwner&) {
  return UnimplementedError("CudaEventOwner: this build has no CUDA support");
}

#endif  // TANDEM_WITH_CUDA

// Move operations and destructors are the same in both builds.
HostRegistration::HostRegistration(HostRegistration&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)) {}
HostRegistration& HostRegistration::operator=(HostRegistration&& other) noexcept {
  if (this != &other) {
    Reset();
    data_ = std::exchange(other.data_, nullptr);
  }
  return *this;
}
HostRegistration::~HostRegistration() { Reset(); }

CudaStreamOwner::CudaStreamOwner(CudaStreamOwner&& other) noexcept
    : stream_(std::exchange(other.stream_, nullptr)), device_(other.device_) {}
CudaStreamOwner& CudaStreamOwner::operator=(CudaStreamOwner&& other) noexcept {
  if (this != &other) {
    Reset();
    stream_ = std::exchange(other.stream_, nullptr);
    device_ = other.device_;
  }
  return *this;
}
CudaStreamOwner::~CudaStreamOwner() { Reset(); }

CudaEventOwner::CudaEventOwner(CudaEventOwner&& other) noexcept
    : event_(std::exchange(other.event_, nullptr)), device_(other.device_) {}
CudaEventOwner& CudaEventOwner::operator=(CudaEventOwner&& other) noexcept {
  if (this != &other) {
    Reset();
    event_ = std::exchange(other.event_, nullptr);
    device_ = other.device_;
  }
  return *this;
}
CudaEventOwner::~CudaEventOwner() { Reset(); }

}  // namespace tandem
