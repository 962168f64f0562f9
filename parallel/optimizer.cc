#include "parallel/optimizer.h"

#include <cmath>

#include "ops/ops.h"

namespace tandem::parallel {

StatusOr<std::unique_ptr<ParallelOptimizer>> ParallelOptimizer::Create(
    ops::Context& ctx, model::LlamaModel& model, const MeshGroups& groups,
    const ParallelOptimizerOptions& opts, std::vector<model::Parameter>* adapter_params) {
  std::unique_ptr<ParallelOptimizer> o(new ParallelOptimizer(ctx, model, groups, opts));
  o->adapter_params_ = adapter_params;
  collectives::Communicator* replicas = groups.dp_cp.get();
  if (adapter_params != nullptr && opts.zero) {
    return UnimplementedError(
        "training an adapter (LoRA, S2FT) on a mesh: parallel.zero must be 0 (the adapter's "
        "Adam moments are small; ZeRO-1 shards the model's flat buffers only)");
  }
  if (opts.zero) {
    if (replicas == nullptr) return InvalidArgumentError("ZeRO-1 needs the dp_cp group");
    TANDEM_ASSIGN_OR_RETURN(o->zero_, ZeroOptimizer::Create(ctx, *replicas, model));
    return o;
  }
  auto& params = o->params();
  o->m_.resize(params.size());
  o->v_.resize(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params[i].trainable) continue;
    for (Tensor* t : {&o->m_[i], &o->v_[i]}) {
      TANDEM_ASSIGN_OR_RETURN(
          *t, Tensor::Empty(params[i].master.shape(), DType::kF32, ctx.allocator()));
      TANDEM_RETURN_IF_ERROR(ops::Fill(ctx, *t, 0.0f));
    }
  }
  if (replicas != nullptr && replicas->size() > 1) {
    GradReducerOptions ro;
    ro.bucket_bytes = opts.bucket_bytes;
    if (adapter_params == nullptr) ro.flat_grads = &model.grads_flat();  // reduced in place
    o->reducer_ = std::make_unique<GradReducer>(ctx, *replicas, params, ro);
    GradReducer* r = o->reducer_.get();
    if (adapter_params == nullptr) {  // the model names its own parameters as they become final
      model.SetGradReadyCallback(
          [r](const std::vector<size_t>& ready) { return r->MarkReady(ready); });
    }
  }
  return o;
}

ParallelOptimizer::~ParallelOptimizer() {
  if (reducer_ && adapter_params_ == nullptr) model_.SetGradReadyCallback(nullptr);
}

void ParallelOptimizer::BeginBackward(bool last) {
  if (reducer_) reducer_->Begin(last);
}

Status ParallelOptimizer::FinishBackward() {
  if (zero_) return zero_->ReduceScatterGrads();
  if (reducer_) return reducer_->Finish();
  return Status::Ok();
}

StatusOr<double> ParallelOptimizer::GradNorm() {
  StatusOr<double> sq = zero_ ? zero_->GlobalGradNormSquared(groups_.tp.get())
                              : GlobalGradNormSquared(ctx_, params(), groups_.tp.get());
  if (!sq.ok()) return sq.status();
  return std::sqrt(*sq);
}

Status ParallelOptimizer::Step(float lr, int64_t step, float grad_scale) {
  ops::AdamWParams ap;
  ap.lr = lr;
  ap.beta1 = opts_.beta1;
  ap.beta2 = opts_.beta2;
  ap.eps = opts_.eps;
  ap.weight_decay = opts_.weight_decay;
  ap.step = step;
  ap.grad_scale = grad_scale;
  if (zero_) return zero_->Step(ap);
  auto& params = this->params();
  for (size_t i = 0; i < params.size(); ++i) {
    model::Parameter& p = params[i];
    if (!p.trainable) continue;
    ops::AdamWParams pp = ap;
    if (!p.weight_decay) pp.weight_decay = 0;
    Tensor weights = p.weight.storage() == p.master.storage() ? Tensor() : p.weight;
    TANDEM_RETURN_IF_ERROR(ops::AdamW(ctx_, p.master, m_[i], v_[i], weights, p.grad, pp));
  }
  return ctx_.Synchronize();
}

Status ParallelOptimizer::SyncMasters() { return zero_ ? zero_->GatherMasters() : Status::Ok(); }

std::vector<ParallelOptimizer::StateView> ParallelOptimizer::StateViews() {
  if (zero_) return zero_->StateViews();
  std::vector<StateView> views;
  auto& params = this->params();
  for (size_t i = 0; i < params.size(); ++i) {
    const model::Parameter& p = params[i];
    if (!p.trainable) continue;
    const int64_t n = p.master.numel();
    views.push_back({i, 0, n, p.master.View({n}), m_[i].View({n}), v_[i].View({n})});
  }
  return views;
}

}  // namespace tandem::parallel
