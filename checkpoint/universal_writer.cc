#include "checkpoint/universal_writer.h"

#include "core/logging.h"

namespace tandem::checkpoint {

StatusOr<std::vector<TensorShard>> CopyShardsToHost(const std::vector<TensorShard>& shards) {
  std::vector<TensorShard> out;
  out.reserve(shards.size());
  for (const TensorShard& s : shards) {
    TensorShard c = s;
    for (Tensor* t : {&c.master, &c.exp_avg, &c.exp_avg_sq}) {
      if (!t->defined()) continue;
      TANDEM_ASSIGN_OR_RETURN(*t, CopyToHostBlocking(*t));  // always a fresh copy
    }
    out.push_back(std::move(c));
  }
  return out;
}

CheckpointWriter::CheckpointWriter(std::string dir, collectives::Communicator* group,
                                   SaveOptions options)
    : dir_(std::move(dir)), group_(group), options_(std::move(options)) {}

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
