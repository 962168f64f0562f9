#include "checkpoint/universal_writer.h"

#include <algorithm>

#include "core/logging.h"

namespace tandem::checkpoint {

StatusOr<std::vector<TensorShard>> CopyShardsToHost(const std::vector<TensorShard>& shards,
                                                    Allocator* host) {
  std::vector<TensorShard> out;
  out.reserve(shards.size());
  for (const TensorShard& s : shards) {
    TensorShard c = s;
    for (Tensor* t : {&c.master, &c.exp_avg, &c.exp_avg_sq}) {
      if (!t->defined()) continue;
      // always a fresh copy
      TANDEM_ASSIGN_OR_RETURN(*t, host ? CopyToDeviceBlocking(*t, *host) : CopyToHostBlocking(*t));
      if (t->dtype() != DType::kF32) {  // bf16 optimizer state: saved as f32 (exact)
        Tensor wide = Tensor::Cpu(t->shape(), DType::kF32);
        TANDEM_RETURN_IF_ERROR(CopyTensor(wide, *t));
        *t = std::move(wide);
      }
    }
    out.push_back(std::move(c));
  }
  return out;
}

CheckpointWriter::CheckpointWriter(std::string dir, collectives::Communicator* group,
                                   SaveOptions options)
    : dir_(std::move(dir)), group_(group), options_(std::move(options)) {}

StatusOr<std::vector<TensorShard>> CheckpointWriter::CopyToHost(
    const std::vector<TensorShard>& shards) {
  const bool from_device = std::any_of(shards.begin(), shards.end(), [](const TensorShard& s) {
    return s.master.defined() && s.master.device().is_cuda();
  });
  if (from_device && pinned_ == nullptr) {
    TANDEM_ASSIGN_OR_RETURN(pinned_, CreatePinnedHostAllocator());
  }
  return CopyShardsToHost(shards, from_device ? pinned_.get() : nullptr);
}

CheckpointWriter::~CheckpointWriter() {
  const Status s = Wait();
  if (!s.ok()) TANDEM_LOG(ERROR, "ckpt") << "background checkpoint save failed: " << s.message();
}

Status CheckpointWriter::Submit(UniversalMeta meta, std::vector<TensorShard> shards) {
  const Status previous = Wait();
  thread_ = std::thread([this, meta = std::move(meta), shards = std::move(shards)] {
    StatusOr<std::string> path = SaveUniversal(dir_, meta, shards, group_, options_);
    result_ = path.status();
    done_path_ = path.ok() ? *path : "";
  });
  return previous;
}

Status CheckpointWriter::Wait() {
  if (!thread_.joinable()) return Status::Ok();
  thread_.join();
  if (result_.ok()) last_path_ = done_path_;
  return std::exchange(result_, Status::Ok());
}

}  // namespace tandem::checkpoint
