#include "core/allocator.h"

#include <cstdlib>

namespace tandem {
namespace {

class HeapAllocator final : public Allocator {
 public:
  StatusOr<void*> Allocate(size_t num_bytes) override {
    const size_t rounded = ((num_bytes + 255) / 256) * 256;
    void* p = std::aligned_alloc(256, rounded == 0 ? 256 : rounded);
    if (p == nullptr) {
      return ResourceExhaustedError(StrCat("host allocation of ", num_bytes, " bytes failed"));
    }
    return p;
  }
  void Deallocate(void* ptr, size_t) override { std::free(ptr); }
  Device device() const override { return Device::Cpu(); }
};

}  // namespace

Allocator& HostAllocator() {
  static HeapAllocator* const allocator = new HeapAllocator();  // stateless; never destroyed
  return *allocator;
}

}  // namespace tandem
