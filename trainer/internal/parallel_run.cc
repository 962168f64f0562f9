#include "trainer/internal/parallel_run.h"

#include <cmath>

#include "collectives/nccl.h"
#include "parallel/ring_attention.h"

namespace tandem::trainer::internal {

Status ParallelRun::Close() {
  optimizer.reset();
  Status s = groups.Close();
  for (auto* w : {&grad_world, &device_world}) {
    if (*w == nullptr) continue;
    Status d = (*w)->Close();
    if (s.ok()) s = d;
  }
  return s;
}

StatusOr<std::unique_ptr<ParallelRun>> OpenParallelRun(const ParallelSection& p,
                                                       collectives::Communicator& world,
                                                       ops::Context& ctx, int local_rank) {
  auto run = std::make_unique<ParallelRun>();
  run->world = &world;
  TANDEM_ASSIGN_OR_RETURN(run->shape,
                          parallel::ResolveMesh(world.size(), static_cast<int>(p.dp),
                                                static_cast<int>(p.cp), static_cast<int>(p.tp)));
  collectives::Communicator* base = &world;
  if (ctx.is_cuda()) {
    collectives::CollectiveOptions o;
    o.timeout_s = p.timeout_s;
    o.stream = ctx.stream();  // ordered with the model's kernels
    TANDEM_ASSIGN_OR_RETURN(run->device_world,
                            collectives::CreateNcclWorld(world, ctx.device().index, o));
    base = run->device_world.get();
  }
  TANDEM_ASSIGN_OR_RETURN(run->groups, parallel::CreateMeshGroups(*base, run->shape));
  if (ctx.is_cuda() && run->shape.dp * run->shape.cp > 1) {
    collectives::CollectiveOptions o;
    o.timeout_s = p.timeout_s;  // stream = nullptr: the communicator owns one
    TANDEM_ASSIGN_OR_RETURN(run->grad_world,
                            collectives::CreateNcclWorld(world, ctx.device().index, o));
    const parallel::MeshCoords& c = run->groups.coords;
    TANDEM_RETURN_IF_ERROR(run->groups.dp_cp->Close());
    TANDEM_ASSIGN_OR_RETURN(run->groups.dp_cp,
                            run->grad_world->Split(c.tp, c.dp * run->shape.cp + c.cp, "dp_cp"));
  }
  run->hooks =
      std::make_unique<parallel::MeshModelHooks>(ctx, run->groups.tp.get(), run->groups.cp.get());
  (void)local_rank;
  return run;
}

StatusOr<model::Batch> SliceForCp(const ParallelRun& run, const TokenBatch& b) {
  model::Batch mb;
  mb.tokens = b.tokens;
  mb.targets = b.targets;
  mb.positions = b.positions;
  mb.segment_ids = b.segment_ids;
  const int cp = run.shape.cp, c = run.groups.coords.cp;
  if (cp == 1) return mb;
  if (b.segment_ids.defined()) {
    return UnimplementedError(
        "data.packing = doc_mask (packed documents) with parallel.cp > 1 is not supported: use "
        "data.packing = eos");
  }
  Tensor positions = b.positions;
  if (!positions.defined()) {
    const int64_t B = b.tokens.dim(0), T = b.tokens.dim(1);
    positions = Tensor::Cpu({B, T}, DType::kI32);
    for (int64_t i = 0; i < B * T; ++i) positions.data<int32_t>()[i] = static_cast<int32_t>(i % T);
  }
  TANDEM_ASSIGN_OR_RETURN(mb.tokens, parallel::ZigZagLocal(b.tokens, cp, c));
  TANDEM_ASSIGN_OR_RETURN(mb.targets, parallel::ZigZagLocal(b.targets, cp, c));
  TANDEM_ASSIGN_OR_RETURN(mb.positions, parallel::ZigZagLocal(positions, cp, c));
  mb.segment_ids = Tensor();
  return mb;
}

Status SumOverReplicas(ParallelRun& run, ops::Context& ctx, std::vector<double>& values) {
  // f32 sums of per-rank sums: losses and counts far below 2^24 per rank stay exact enough.
  Tensor t = Tensor::Cpu({static_cast<int64_t>(values.size())}, DType::kF32);
  for (size_t i = 0; i < values.size(); ++i) t.data<float>()[i] = static_cast<float>(values[i]);
  TANDEM_RETURN_IF_ERROR(
      parallel::AllReduceAnywhere(ctx, *run.groups.dp_cp, t, collectives::ReduceOp::kSum));
  for (size_t i = 0; i < values.size(); ++i) values[i] = t.data<float>()[i];
  return Status::Ok();
}

namespace {

int64_t CountLossTargets(const Tensor& targets) {
  int64_t n = 0;
  for (int64_t i = 0; i < targets.numel(); ++i)
    n += targets.data<int32_t>()[i] != ops::kIgnoreIndex;
  return n;
}

}  // namespace

StatusOr<ParallelUpdate> ParallelTrainStep(ParallelRun& run, ops::Context& ctx,
                                           model::LlamaModel& model, DataLoader& loader,
                                           int64_t grad_accum, double grad_clip, float lr,
                                           int64_t step,
                                           const std::function<Status()>& before_update) {
  std::vector<model::Batch> micro;
  std::vector<double> totals = {0, 0};  // target tokens, input tokens of this rank
  for (int64_t a = 0; a < grad_accum; ++a) {
    TANDEM_ASSIGN_OR_RETURN(TokenBatch b, loader.Next());
    TANDEM_ASSIGN_OR_RETURN(model::Batch mb, SliceForCp(run, b));
    totals[0] += static_cast<double>(CountLossTargets(mb.targets));
    totals[1] += static_cast<double>(mb.tokens.numel());
    micro.push_back(std::move(mb));
  }
  TANDEM_RETURN_IF_ERROR(SumOverReplicas(run, ctx, totals));
  const float scale = totals[0] > 0 ? static_cast<float>(1.0 / totals[0]) : 0.0f;
  TANDEM_RETURN_IF_ERROR(model.ZeroGrads());
  std::vector<double> loss = {0, 0};
  for (size_t i = 0; i < micro.size(); ++i) {
    run.optimizer->BeginBackward(i + 1 == micro.size());
    TANDEM_ASSIGN_OR_RETURN(model::LossSum l, model.ForwardBackward(micro[i], scale));
    loss[0] += l.sum;
    loss[1] += static_cast<double>(l.count);
  }
  TANDEM_RETURN_IF_ERROR(run.optimizer->FinishBackward());
  TANDEM_RETURN_IF_ERROR(SumOverReplicas(run, ctx, loss));
  ParallelUpdate u;
  u.loss.sum = loss[0];
  u.loss.count = static_cast<int64_t>(std::llround(loss[1]));
  u.tokens = static_cast<int64_t>(std::llround(totals[1]));
  TANDEM_ASSIGN_OR_RETURN(u.grad_norm, run.optimizer->GradNorm());
  if (!std::isfinite(u.grad_norm)) {
    return InternalError(
        StrCat("step ", step, ": the gradient norm is ", u.grad_norm, "; stopping"));
  }
  const double clip =
      (grad_clip > 0 && u.grad_norm > grad_clip) ? grad_clip / (u.grad_norm + 1e-6) : 1.0;
  if (before_update) TANDEM_RETURN_IF_ERROR(before_update());
  TANDEM_RETURN_IF_ERROR(run.optimizer->Step(lr, step, static_cast<float>(clip)));
  return u;
}

StatusOr<double> ParallelEvaluate(ParallelRun& run, ops::Context& ctx, model::LlamaModel& model,
                                  DataLoader& loader, int64_t batches) {
  TANDEM_RETURN_IF_ERROR(loader.Seek(DataPosition{}));
  std::vector<double> total = {0, 0};
  for (int64_t i = 0; i < batches; ++i) {
    TANDEM_ASSIGN_OR_RETURN(TokenBatch b, loader.Next());
    TANDEM_ASSIGN_OR_RETURN(model::Batch mb, SliceForCp(run, b));
    TANDEM_ASSIGN_OR_RETURN(model::LossSum s, model.Loss(mb));
    total[0] += s.sum;
    total[1] += static_cast<double>(s.count);
  }
  TANDEM_RETURN_IF_ERROR(SumOverReplicas(run, ctx, total));
  return total[1] > 0 ? total[0] / total[1] : 0.0;
}

}  // namespace tandem::trainer::internal
