#include "core/device.h"

#include <cstdlib>

#ifdef TANDEM_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace tandem {

std::string Device::ToString() const {
  return is_cpu() ? std::string("cpu") : "cuda:" + std::to_string(index);
}

StatusOr<Device> ParseDevice(std::string_view text) {
  if (text == "cpu") return Device::Cpu();
  if (text == "cuda") return Device::Cuda(0);
  if (text.substr(0, 5) == "cuda:" && text.size() > 5) {
    int index = 0;
    for (char c : text.substr(5)) {
      if (c < '0' || c > '9') {
        return InvalidArgumentError(StrCat("bad device '", text, "' (expected cpu, cuda or cuda:N)"));
      }
      index = index * 10 + (c - '0');
    }
    return Device::Cuda(index);
  }
  return InvalidArgumentError(StrCat("bad device '", text, "' (expected cpu, cuda or cuda:N)"));
}

bool BuiltWithCuda() {
#ifdef TANDEM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int CudaDeviceCount() {
#ifdef TANDEM_WITH_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
#else
  return 0;
#endif
}

bool CudaAvailable() { return CudaDeviceCount() > 0; }

std::string DeviceName(Device device) {
  if (device.is_cpu()) return "cpu";
#ifdef TANDEM_WITH_CUDA
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, device.index) == cudaSuccess) return prop.name;
  cudaGetLastError();
#endif
  return device.ToString();
}

}  // namespace tandem
