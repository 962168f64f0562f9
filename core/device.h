// Where a tensor lives: the host ("cpu") or one CUDA device ("cuda:N").
#pragma once

#include <string>
#include <string_view>

#include "core/status.h"

// The CUDA stream type, declared without the CUDA headers so CPU-only code can name it.
struct CUstream_st;
struct CUevent_st;

namespace tandem {

using CudaStream = CUstream_st*;  // same type as cudaStream_t; nullptr is the legacy stream
using CudaEvent = CUevent_st*;

struct Device {
  enum class Kind : uint8_t { kCpu, kCuda };
  Kind kind = Kind::kCpu;
  int index = 0;

  static Device Cpu() { return Device{}; }
  static Device Cuda(int index) { return Device{Kind::kCuda, index}; }
  bool is_cpu() const { return kind == Kind::kCpu; }
  bool is_cuda() const { return kind == Kind::kCuda; }
  std::string ToString() const;  // "cpu" or "cuda:N"
  bool operator==(const Device& o) const { return kind == o.kind && (is_cpu() || index == o.index); }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

// Parses "cpu", "cuda" (= cuda:0) or "cuda:N".
StatusOr<Device> ParseDevice(std::string_view text);

// True when this build has CUDA and at least one device is visible.
bool CudaAvailable();
// Number of visible CUDA devices (0 in CPU-only builds or without a driver).
int CudaDeviceCount();
// True when tandem was compiled with CUDA support.
bool BuiltWithCuda();
// Marketing name of a device ("NVIDIA H100 80GB HBM3"), or "cpu".
std::string DeviceName(Device device);

}  // namespace tandem
