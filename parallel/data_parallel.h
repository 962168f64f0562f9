// Data parallelism: gradients summed over the replicas of each parameter, in buckets issued
// while backward runs (GradReducer), and the ZeRO-1 optimizer that shards the f32 master weights
// and Adam moments over those replicas (ZeroOptimizer). Also the global gradient norm of a
// dp x cp x tp mesh (GlobalGradNormSquared).
//
//   GradReducer reducer(ctx, *groups.dp_cp, model->parameters(), {.bucket_bytes = 25 << 20});
//   model->SetGradReadyCallback([&](const std::vector<size_t>& ps) { return reducer.MarkReady(ps);
//   }); reducer.Begin(/*enabled=*/last_micro_batch);   // before each ForwardBackward
//   model->ForwardBackward(batch, scale);
//   reducer.Finish();                               // after the last one
//
// Buckets: the parameters with a gradient, in reverse index order (the order backward finishes
// them), cut every bucket_bytes; a bucket is issued as soon as every gradient in it is final, and
// buckets are issued in bucket order on every rank. A bucket whose gradients lie in the model's
// flat gradient buffer (GradReducerOptions::flat_grads) is summed in place; otherwise it is
// copied into one f32 buffer, summed over the group and copied back. On host communicators the calls are synchronous. On an
// NCCL group with a stream of its own, each bucket's all-reduce waits (CUDA event) for its
// copy on the context stream and then runs on the group's stream while backward goes on; every
// bucket has its own slice of the staging buffer, and Finish() makes the context stream wait for
// the group's stream before copying the sums back (no host wait). On an NCCL group that shares
// the context's stream, the calls are ordered on it (no overlap).
//
// Ownership: the context, communicators and model must outlive these objects. Thread-safety:
// the thread that runs the model.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "collectives/communicator.h"
#include "core/stream.h"
#include "model/llama.h"
#include "ops/context.h"
#include "ops/ops.h"

namespace tandem::parallel {

struct GradReducerOptions {
  int64_t bucket_bytes = 25 << 20;  // f32 bytes per bucket
  // The model's flat f32 gradient buffer (LlamaModel::grads_flat(), read at each layout), or
  // null. When every bucket's gradients are views into it on the communicator's device, each
  // bucket is reduced in place over the range its members span (the zero padding between them
  // included) and no staging buffer exists.
  const Tensor* flat_grads = nullptr;
};

class GradReducer {
 public:
  // `params`: the model's parameters (their grad tensors are read at each call; the layout may
  // change between ZeroGrads calls but not during a backward pass).
  GradReducer(ops::Context& ctx, collectives::Communicator& group,
              std::vector<model::Parameter>& params, const GradReducerOptions& options);

  // A backward pass begins; when !enabled (an earlier micro-batch of a gradient accumulation),
  // MarkReady does nothing and Finish reduces nothing.
  void Begin(bool enabled);
  // The gradients of `params` (indices) are final for this pass.
  Status MarkReady(const std::vector<size_t>& params);
  // Issues the buckets not yet issued and waits for all of them.
  Status Finish();

  int num_buckets() const { return static_cast<int>(buckets_.size()); }

 private:
  struct Bucket {
    std::vector<size_t> members;
    int64_t offset = 0;  // in staging_ (0 for every bucket unless overlapping), or in_place_:
                         // in *flat_grads, the start of the range the members span
    int64_t numel = 0;   // in_place_: the span's length
    int pending = 0;
  };
  Status Layout();
  bool PlaceInFlat();  // in-place spans of every bucket when possible
  Status AllocateStaging();  // staging_ for the buckets (copy in, reduce, copy back)
  Status Issue(Bucket& bucket);
  Status IssueOverlapped(Bucket& bucket);
  Status CopyBack(const Bucket& bucket);

  ops::Context& ctx_;
  collectives::Communicator& group_;
  std::vector<model::Parameter>& params_;
  GradReducerOptions options_;
  std::vector<Bucket> buckets_;
  std::vector<int> bucket_of_;  // param -> bucket, -1 when it has no gradient
  std::vector<bool> ready_;
  size_t next_ = 0;  // first bucket not yet issued
  bool enabled_ = false;
  Tensor staging_;  // f32 on the communicator's device: the largest bucket, or all when overlapping
  bool overlap_ = false;                   // NCCL on a stream other than the context's
  bool in_place_ = false;                  // buckets are spans of *options_.flat_grads
  std::unique_ptr<CudaEventOwner> event_;  // overlap_: orders the two streams
};

// ZeRO-1 over `group` (the dp x cp replicas): the model's flat f32 gradient is reduce-scattered,
// each rank runs AdamW on its 1/size shard of the flat master weights and moments, and the
// updated weights are all-gathered. Needs every parameter trainable and
// ModelOptions::flat_numel_multiple a multiple of group.size().
class ZeroOptimizer {
 public:
  static StatusOr<std::unique_ptr<ZeroOptimizer>> Create(ops::Context& ctx,
                                                         collectives::Communicator& group,
                                                         model::LlamaModel& model);

  // grad shard = sum over the group of this rank's part of the flat gradient.
  Status ReduceScatterGrads();
  // The squared global gradient norm from the shards (after ReduceScatterGrads): each
  // parameter's sum of squares / tp_copies, summed over the group and over `tp` (may be null).
  StatusOr<double> GlobalGradNormSquared(collectives::Communicator* tp);
  // AdamW on the shard (`base` with weight_decay replaced by 0 for parameters without decay),
  // then the all-gather of the updated weights.
  Status Step(const ops::AdamWParams& base);
  // The f32 masters of every parameter from the shards (CUDA: before saving; CPU: no-op).
  Status GatherMasters();
  // The shard's masters from the per-parameter f32 masters (after writing them, e.g. when
  // resuming from a checkpoint; CPU: no-op, the shard is a view of the weights).
  Status ReloadMasters();
  // The other way (after writing the shard's masters, e.g. from a snapshot of this rank): every
  // parameter's master and compute weights from the shards of the whole group.
  Status RestoreFromShard();

  // One parameter's part of this rank's shard: elements [begin, end) of the parameter's
  // (flattened) local tensor, with views of the shard's master and moments for it.
  struct StateView {
    size_t param;
    int64_t begin, end;
    Tensor master, exp_avg, exp_avg_sq;  // f32 [end - begin], views into the shard
  };
  std::vector<StateView> StateViews();

 private:
  struct Segment {
    size_t param;
    int64_t begin, end;  // in the flat buffers
  };
  ZeroOptimizer(ops::Context& ctx, collectives::Communicator& group, model::LlamaModel& model)
      : ctx_(ctx), group_(group), model_(model) {}

  ops::Context& ctx_;
  collectives::Communicator& group_;
  model::LlamaModel& model_;
  int64_t shard_begin_ = 0, shard_numel_ = 0;
  Tensor master_;      // f32 [shard]: a view of the flat weights on CPU, an own copy on CUDA
  Tensor m_, v_;       // f32 [shard]
  Tensor grad_shard_;  // f32 [shard]
  std::vector<Segment> segments_;
};

// Squared global gradient norm of `params` on a mesh: each parameter's sum of squares weighted
// by 1 / tp_copies, summed over `tp` (may be null). Gradients must already be summed over
// dp x cp (every replica then holds the same values).
StatusOr<double> GlobalGradNormSquared(ops::Context& ctx,
                                       const std::vector<model::Parameter>& params,
                                       collectives::Communicator* tp);

}  // namespace tandem::parallel
