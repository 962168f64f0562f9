#include "trainer/internal/layer_file.h"

namespace tandem::trainer::internal {

Status LayerFile::Open(const void* inside) {
  TANDEM_ASSIGN_OR_RETURN(path_, memory_.PathOf(inside));
  offload::IoUringStorageOptions o;
  o.create = false;
  o.queue_depth = 16;
  o.slab_bytes = size_t{4} << 20;  // 64 MiB in flight
  // The blocks are written through the mapping, never through the engine: nothing to verify.
  o.verify_checksums = false;
  TANDEM_ASSIGN_OR_RETURN(file_, offload::IoUringStorage::Open(path_, o));
  return Status::Ok();
}

Status LayerFile::Read(uint64_t offset, void* dst, size_t num_bytes) {
  if (file_ == nullptr) {
    return FailedPreconditionError("model.offload = \"nvme\": the layer file is not open yet");
  }
  return file_->Read(offset, dst, num_bytes);
}

bool LayerFile::direct_io() const { return file_ != nullptr && file_->direct_io(); }

}  // namespace tandem::trainer::internal
