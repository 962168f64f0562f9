// OffloadedOptimizer: AdamW state kept off the GPU (host memory or a Storage file), updated on
// CPU worker threads chunk by chunk as gradients arrive from backward, handing back bf16 weights.
//
// The optimizer owns, per parameter, the f32 master weights and Adam moments (host tier: in host
// memory; storage tier: in a Storage file, one [master | m | v] record per chunk, read and
// written back around each update) and a host bf16 copy of the weights. One step:
//
//   opt->BeginStep(adamw_params, [&](int p, int64_t c, int64_t first, const Bf16* w, int64_t n) {
//     // runs on a worker thread once chunk c of parameter p is updated: copy w[0, n) to the
//     // GPU weights of p at element `first` (e.g. cudaMemcpyAsync from pinned memory)
//   });
//   // from backward, on any thread, as soon as a chunk's f32 gradients are final:
//   opt->GradientsReady(p, c, grad_chunk);     // or GradientsReady(p, grad) for all of p
//   TANDEM_RETURN_IF_ERROR(opt->FinishStep()); // waits for every chunk; first error
//
// The update is CpuAdamWRange, so results are bitwise equal to ops::AdamW over the whole
// parameter whatever the chunking, order of arrival or tier (tested).
//
// Ownership: the optimizer owns its state and worker threads (joined by the destructor, which
// does no I/O); `storage` (storage tier) is not owned and must outlive it. Gradient buffers are
// the caller's and must stay valid until FinishStep returns. Thread-safety: GradientsReady may be
// called from any thread during a step; the other methods from one thread, outside a step
// (between FinishStep and the next BeginStep). The callback runs on worker threads, possibly
// several at once (for different chunks).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "core/dtype.h"
#include "core/status.h"
#include "offload/cpu_adamw.h"
#include "offload/storage.h"
#include "offload/topology.h"
#include "ops/ops.h"

namespace tandem::offload {

enum class OptimizerTier : uint8_t { kHost, kStorage };

struct OffloadedParam {
  std::string name;
  int64_t numel = 0;
  // false: this parameter's update has no weight decay whatever AdamWParams::weight_decay says
  // (norms), exactly as ops::AdamW with weight_decay = 0.
  bool weight_decay = true;
};

struct OffloadedOptimizerOptions {
  OptimizerTier tier = OptimizerTier::kHost;
  int64_t chunk_elems = int64_t{1} << 20;  // elements per chunk (the unit of overlap and I/O)
  int num_threads = 2;                     // worker threads
  std::optional<SimdLevel> simd;           // default: BestSimdLevel()
  uint64_t storage_offset = 0;             // storage tier: byte offset of the first record
  // Storage tier: write zero records at Create. false skips that (the caller SetStates every
  // parameter before the first step, as the trainer does), halving the startup I/O.
  bool zero_storage = true;
  // Host tier: where master weights and moments live (PlacementPolicy::Place(kOptimizerState)
  // gives local DRAM); the default, no nodes, is plain memory.
  Placement host_placement;
};

// Called on a worker thread after chunk `chunk` of parameter `param` was updated: `weights` holds
// the new bf16 values of elements [first_elem, first_elem + num_elems); valid until the next
// BeginStep.
using ChunkUpdatedFn = std::function<void(int param, int64_t chunk, int64_t first_elem,
                                          const Bf16* weights, int64_t num_elems)>;
// Like ChunkUpdatedFn with the chunk's new f32 master values (valid during the call only), for
// callers that keep f32 weights (a CPU model). Called before the ChunkUpdatedFn of the chunk.
using ChunkMasterFn = std::function<void(int param, int64_t chunk, int64_t first_elem,
                                         const float* master, int64_t num_elems)>;

class OffloadedOptimizer {
 public:
  // InvalidArgument for empty or non-positive sizes, a bad chunk size, a storage tier without
  // storage or an unsupported SIMD level. Master weights and moments start at zero
  // (storage tier: only with options.zero_storage).
  static StatusOr<std::unique_ptr<OffloadedOptimizer>> Create(
      std::vector<OffloadedParam> params, const OffloadedOptimizerOptions& options,
      Storage* storage = nullptr);
  ~OffloadedOptimizer();
  OffloadedOptimizer(const OffloadedOptimizer&) = delete;
  OffloadedOptimizer& operator=(const OffloadedOptimizer&) = delete;

  int num_params() const { return static_cast<int>(params_.size()); }
  const OffloadedParam& param(int index) const { return params_.at(index); }
  int64_t num_chunks(int param) const;
  int64_t chunk_elems() const { return options_.chunk_elems; }
  // Bytes of the storage tier's file this optimizer uses (from storage_offset).
  uint64_t storage_bytes() const { return storage_bytes_; }

  // Sets parameter `param`'s master weights (f32 [numel]) and moments (nullptr: zeros), and its
  // bf16 weights to the rounded master. Outside a step.
  Status SetState(int param, const float* master, const float* m, const float* v);
  // Copies the state out (any pointer may be nullptr). Outside a step.
  Status GetState(int param, float* master, float* m, float* v);
  // The host bf16 weights of `param` as of the last update or SetState ([numel]).
  const Bf16* weights_bf16(int param) const { return Weights(param); }
  // Host tier: `param`'s state as f32 [3, numel] (master, m, v), owned by the optimizer; change it
  // only outside a step. nullptr for the storage tier.
  float* host_state(int param) {
    return options_.tier == OptimizerTier::kHost ? HostState(param, 0) : nullptr;
  }

  // Starts a step; `on_chunk_updated` may be empty. FailedPrecondition inside a step.
  Status BeginStep(const ops::AdamWParams& params, ChunkUpdatedFn on_chunk_updated);
  // The same, also handing each updated chunk's f32 master to `on_master_updated` (may be empty).
  Status BeginStep(const ops::AdamWParams& params, ChunkUpdatedFn on_chunk_updated,
                   ChunkMasterFn on_master_updated);
  // The f32 gradients of chunk `chunk` of `param` ([chunk numel], from element chunk *
  // chunk_elems) are final: queue its update. InvalidArgument for bad indices or a chunk already
  // given this step; FailedPrecondition outside a step. Thread-safe.
  Status GradientsReady(int param, int64_t chunk, const float* grad_chunk);
  // Every chunk of `param` from one f32 [numel] gradient.
  Status GradientsReady(int param, const float* grad);
  // Waits for every chunk's update and ends the step. FailedPrecondition (naming the first
  // missing parameter and chunk) when some chunk was never given; otherwise the first update
  // error (I/O), or OK.
  Status FinishStep();
  // The first update error of the step in progress so far (OK when none), so that a caller
  // waiting on resources the failed chunks hold can stop. Thread-safe.
  Status step_error();

 private:
  struct Task {
    int param;
    int64_t chunk;
    const float* grad;
  };
  OffloadedOptimizer(std::vector<OffloadedParam> params, const OffloadedOptimizerOptions& options,
                     Storage* storage);
  void WorkerLoop();
  bool InStep();
  Status Update(const Task& task, std::vector<float>& scratch);
  uint64_t RecordOffset(int param, int64_t chunk) const;
  int64_t ChunkLen(int param, int64_t chunk) const;

  std::vector<OffloadedParam> params_;
  OffloadedOptimizerOptions options_;
  SimdLevel simd_;
  Storage* storage_;
  uint64_t storage_bytes_ = 0;
  std::vector<uint64_t> record_base_;       // per param: offset of its first chunk's record
  std::vector<NumaBuffer> host_state_;      // host tier, per param: [master | m | v] f32 [3, n]
  float* HostState(int param, int which) {  // which: 0 master, 1 m, 2 v
    return static_cast<float*>(host_state_[param].data()) + which * params_[param].numel;
  }
  std::vector<NumaBuffer> weights_;          // per param: its bf16 weights (zeros until set)
  Bf16* Weights(int param) const { return static_cast<Bf16*>(weights_[param].data()); }

  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::deque<Task> queue_;
  std::vector<std::vector<uint8_t>> given_;  // per param, per chunk: gradients given this step
  bool in_step_ = false;
  bool stopping_ = false;
  int64_t remaining_ = 0;  // chunks given and not yet finished
  Status first_error_;
  AdamWScalars scalars_;
  AdamWScalars scalars_no_decay_;  // for parameters with weight_decay == false
  ChunkUpdatedFn on_chunk_updated_;
  ChunkMasterFn on_master_updated_;
  std::vector<std::thread> workers_;
};

}  // namespace tandem::offload
