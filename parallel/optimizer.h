// ParallelOptimizer: the optimizer side of a training step on a dp x cp x tp mesh: gradient
// reduction over the dp x cp replicas (bucketed during backward, or reduce-scattered for
// ZeRO-1), the global gradient norm, and AdamW with PyTorch's update rule.
//
//   TANDEM_ASSIGN_OR_RETURN(auto opt, ParallelOptimizer::Create(ctx, *model, groups, options));
//   for each micro-batch i of n: opt->BeginBackward(i == n - 1); model->ForwardBackward(...);
//   TANDEM_RETURN_IF_ERROR(opt->FinishBackward());
//   TANDEM_ASSIGN_OR_RETURN(double norm, opt->GradNorm());
//   TANDEM_RETURN_IF_ERROR(opt->Step(lr, step, clip_scale));
//
// The model's gradients must be scaled so that their sum over the replicas is the gradient of
// the global mean loss (grad_scale = 1 / target tokens of the global batch). Without ZeRO every
// rank keeps full Adam moments of its (tp-sliced) parameters; with ZeRO-1 each dp x cp replica
// keeps 1/(dp cp) of them (parallel/data_parallel.h).
//
// Ownership: installs a grad-ready callback on the model (removed by the destructor); the
// context, model and groups must outlive it. Thread-safety: the model's thread.
#pragma once

#include <memory>
#include <vector>

#include "model/llama.h"
#include "parallel/data_parallel.h"
#include "parallel/mesh.h"

namespace tandem::parallel {

struct ParallelOptimizerOptions {
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;  // not applied to parameters with weight_decay == false
  bool zero = false;          // ZeRO-1
  int64_t bucket_bytes = 25 << 20;
};

class ParallelOptimizer {
 public:
  // `groups`: dp_cp and tp are used (either may be null for size 1). `adapter_params`: null to
  // train the model's parameters; else the parameters of an attached adapter (LoRA, S2FT), which
  // must outlive the optimizer: their gradients are reduced in FinishBackward (no ZeRO; under tp
  // the adapter does its own tp reductions and its parameters carry tp_copies for the norm).
  static StatusOr<std::unique_ptr<ParallelOptimizer>> Create(
      ops::Context& ctx, model::LlamaModel& model, const MeshGroups& groups,
      const ParallelOptimizerOptions& opts,
      std::vector<model::Parameter>* adapter_params = nullptr);
  ~ParallelOptimizer();
  ParallelOptimizer(const ParallelOptimizer&) = delete;
  ParallelOptimizer& operator=(const ParallelOptimizer&) = delete;

  // Before each ForwardBackward: `last` is the last micro-batch of the update (its backward
  // reduces the gradients as they become final).
  void BeginBackward(bool last);
  // After the last ForwardBackward: every gradient is summed over the replicas.
  Status FinishBackward();
  // The global gradient norm (the same on every rank).
  StatusOr<double> GradNorm();
  // One AdamW update of every trainable parameter with gradients scaled by grad_scale (clipping).
  Status Step(float lr, int64_t step, float grad_scale);
  // Before saving (ZeRO on CUDA: the per-parameter f32 masters from the shards).
  Status SyncMasters();

  // This rank's optimizer state, for checkpoints: without ZeRO every trainable parameter whole
  // (the same on every dp x cp replica); with ZeRO-1 the parameter ranges of this rank's shard
  // (disjoint over the replicas). Views: writing them sets the state. `param` indexes the
  // trained parameters (the model's, or the adapter's). After writing the parameters' masters
  // (resume), call ReloadMasters.
  using StateView = ZeroOptimizer::StateView;
  std::vector<StateView> StateViews();
  bool sharded() const { return zero_ != nullptr; }
  Status ReloadMasters() { return zero_ ? zero_->ReloadMasters() : Status::Ok(); }
  // ZeRO-1: after writing this rank's shard views, every parameter from the group's shards.
  Status RestoreFromShards() { return zero_ ? zero_->RestoreFromShard() : Status::Ok(); }

 private:
  ParallelOptimizer(ops::Context& ctx, model::LlamaModel& model, const MeshGroups& groups,
                    const ParallelOptimizerOptions& opts)
      : ctx_(ctx), model_(model), groups_(groups), opts_(opts) {}

  std::vector<model::Parameter>& params() {
    return adapter_params_ ? *adapter_params_ : model_.parameters();
  }

  ops::Context& ctx_;
  model::LlamaModel& model_;
  const MeshGroups& groups_;
  std::vector<model::Parameter>* adapter_params_ = nullptr;
  ParallelOptimizerOptions opts_;
  std::unique_ptr<GradReducer> reducer_;  // without ZeRO, when there are replicas
  std::unique_ptr<ZeroOptimizer> zero_;
  std::vector<Tensor> m_, v_;  // without ZeRO: per parameter
};

}  // namespace tandem::parallel
