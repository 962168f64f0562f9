// CheckpointWriter: saves universal checkpoints (checkpoint/universal.h) on a background thread,
// so the trainer stalls only for the copy of its state to host memory.
//
//   CheckpointWriter writer(dir, ckpt_group.get(), {.keep_last = 3});
//   ...
//   TANDEM_ASSIGN_OR_RETURN(auto copies, CopyShardsToHost(shards));   // the stall
//   TANDEM_RETURN_IF_ERROR(writer.Submit(meta, std::move(copies)));    // earlier save's error
//   ...
//   TANDEM_RETURN_IF_ERROR(writer.Wait());                             // before exit
//
// One save runs at a time: Submit first waits for the save in flight. Errors surface at the next
// call (Submit or Wait), which returns the failed save's error once; the new save still starts.
//
// Ownership: `group` is not owned and must outlive the writer; the writer's thread is its only
// user (give it a communicator of its own, e.g. world->Split(0, rank, "ckpt")), and every rank of
// it must submit the same sequence of saves. The writer owns the shard copies it was given.
// Thread-safety: Submit, Wait and last_path from one thread (the trainer's).
#pragma once

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/universal.h"
#include "core/cuda_allocator.h"

namespace tandem::checkpoint {

// Deep copies of the shards' tensors into fresh host memory from `host` (default: pageable
// memory), from the host or a device; bf16 tensors (optimizer.precision = "bf16" state) are
// widened to f32 (exactly), as checkpoints hold f32.
StatusOr<std::vector<TensorShard>> CopyShardsToHost(const std::vector<TensorShard>& shards,
                                                    Allocator* host = nullptr);

class CheckpointWriter {
 public:
  CheckpointWriter(std::string dir, collectives::Communicator* group, SaveOptions options);
  // Waits for the save in flight; its error, if any, is logged and dropped.
  ~CheckpointWriter();
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;

  // Waits for the previous save, then starts saving `shards` (host tensors the writer keeps
  // until the save ends). Returns the previous save's error (or OK).
  Status Submit(UniversalMeta meta, std::vector<TensorShard> shards);
  // Waits for the save in flight and returns its result.
  Status Wait();
  // CopyShardsToHost; shards on a CUDA device go into the writer's pinned (page-locked) host
  // memory: the device-to-host copy runs at full bus speed and, after the first save, without
  // new allocations (the previous save's blocks are cached and reused once that save ends; call
  // Wait() first to keep one set). Host shards are copied into pageable memory.
  StatusOr<std::vector<TensorShard>> CopyToHost(const std::vector<TensorShard>& shards);
  // Path of the newest checkpoint this writer published ("" before the first).
  const std::string& last_path() const { return last_path_; }

 private:
  std::string dir_;
  collectives::Communicator* group_;
  SaveOptions options_;
  std::thread thread_;
  Status result_;          // written by the thread, read after join
  std::string done_path_;  // likewise
  std::string last_path_;
  std::unique_ptr<CachingAllocator> pinned_;  // null without CUDA
};

}  // namespace tandem::checkpoint
