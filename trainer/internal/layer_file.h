// LayerFile: model.offload = "nvme". The streamed decoder layers' home is a file under
// model.nvme_path, mapped into host memory (offload::MappedFileAllocator): the model's init, load
// and save, and an offloaded optimizer's bf16 writes, go through the mapping, whose pages the
// kernel writes back and evicts, so the layers need not fit in host memory. The layer stream reads
// each layer from the same file with O_DIRECT through the io_uring engine (offload::
// IoUringStorage; the kernel writes dirty mapped pages of a range back before a direct read of it),
// into its page-locked staging buffers and on to the device.
//
//   LayerFile file(c.model.nvme_path);
//   mopt.stream_layers = true;
//   mopt.stream_host_allocator = &file.memory();
//   mopt.stream_reader = &file;
//   ... create the model ...
//   TANDEM_RETURN_IF_ERROR(file.Open(first_layer_weight.raw_data()));
//
// Ownership: outlives the model (its memory holds the layers). Thread-safety: Read may be called
// from the layer stream's worker threads (the engine serializes).
#pragma once

#include <memory>
#include <string>

#include "model/llama.h"
#include "offload/mapped_file.h"
#include "offload/storage.h"

namespace tandem::trainer::internal {

class LayerFile : public model::LayerReader {
 public:
  explicit LayerFile(std::string dir) : memory_(std::move(dir)) {}

  offload::MappedFileAllocator& memory() { return memory_; }
  // Opens the engine on the file holding `inside` (any byte of the streamed layers' buffer).
  Status Open(const void* inside);
  Status Read(uint64_t offset, void* dst, size_t num_bytes) override;

  bool direct_io() const;
  const std::string& path() const { return path_; }

 private:
  offload::MappedFileAllocator memory_;
  std::string path_;
  std::unique_ptr<offload::IoUringStorage> file_;
};

}  // namespace tandem::trainer::internal
