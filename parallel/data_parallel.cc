#include "parallel/data_parallel.h"

#include <algorithm>

#include "ops/ops.h"
#include "parallel/model_hooks.h"

namespace tandem::parallel {

using collectives::Communicator;
using collectives::ReduceOp;

GradReducer::GradReducer(ops::Context& ctx, Communicator& group,
                         std::vector<model::Parameter>& params, const GradReducerOptions& options)
    : ctx_(ctx), group_(group), params_(params), options_(options) {}

// Buckets over the parameters that have a gradient now, in reverse index order.
Status GradReducer::Layout() {
  buckets_.clear();
  bucket_of_.assign(params_.size(), -1);
  overlap_ = ctx_.is_cuda() && group_.device() == ctx_.device() && group_.stream() != ctx_.stream();
  const int64_t cap = std::max<int64_t>(1, options_.bucket_bytes / 4);
  for (size_t k = params_.size(); k-- > 0;) {
    if (!params_[k].trainable || !params_[k].grad.defined()) continue;
    const int64_t n = params_[k].grad.numel();
    if (buckets_.empty() || buckets_.back().numel + n > cap) buckets_.emplace_back();
    buckets_.back().members.push_back(k);
    buckets_.back().numel += n;
    bucket_of_[k] = static_cast<int>(buckets_.size()) - 1;
  }
  in_place_ = PlaceInFlat();
  if (in_place_) {
    staging_ = Tensor();
  } else {
    TANDEM_RETURN_IF_ERROR(AllocateStaging());
  }
  if (overlap_ && event_ == nullptr) {
    TANDEM_ASSIGN_OR_RETURN(CudaEventOwner e, CudaEventOwner::Create(ctx_.device().index, false));
    event_ = std::make_unique<CudaEventOwner>(std::move(e));
  }
  return Status::Ok();
}

// Every bucket's members are contiguous f32 views into the flat buffer and the buckets' spans do
// not overlap: then each bucket is the span [first element, last element) of its members.
bool GradReducer::PlaceInFlat() {
  const Tensor* flat = options_.flat_grads;
  if (flat == nullptr || !flat->defined() || flat->dtype() != DType::kF32 ||
      flat->device() != group_.device() || !flat->is_contiguous()) {
    return false;
  }
  const float* base = flat->data<float>();
  const int64_t total = flat->numel();
  std::vector<std::pair<int64_t, int64_t>> spans;
  for (Bucket& b : buckets_) {
    int64_t lo = total, hi = 0;
    for (size_t k : b.members) {
      const Tensor& g = params_[k].grad;
      if (g.dtype() != DType::kF32 || !g.is_contiguous() || g.storage() != flat->storage()) {
        return false;
      }
      const int64_t at = g.data<float>() - base;
      if (at < 0 || at + g.numel() > total) return false;
      lo = std::min(lo, at);
      hi = std::max(hi, at + g.numel());
    }
    spans.push_back({lo, hi});
  }
  std::vector<std::pair<int64_t, int64_t>> sorted = spans;
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 1; i < sorted.size(); ++i) {
    if (sorted[i].first < sorted[i - 1].second) return false;  // a span inside another's
  }
  for (size_t i = 0; i < buckets_.size(); ++i) {
    buckets_[i].offset = spans[i].first;
    buckets_[i].numel = spans[i].second - spans[i].first;
  }
  return true;
}

Status GradReducer::AllocateStaging() {
  int64_t need = 0;
  for (Bucket& b : buckets_) {
    b.offset = overlap_ ? need : 0;
    need = overlap_ ? need + b.numel : std::max(need, b.numel);
  }
  if (!staging_.defined() || staging_.numel() < need) {
    Allocator& alloc = group_.device() == ctx_.device() ? ctx_.allocator() : HostAllocator();
    staging_ = Tensor();
    TANDEM_ASSIGN_OR_RETURN(staging_,
                            Tensor::Empty({std::max<int64_t>(1, need)}, DType::kF32, alloc));
  }
  return Status::Ok();
}

void GradReducer::Begin(bool enabled) {
  enabled_ = enabled;
  next_ = 0;
  buckets_.clear();
}

Status GradReducer::MarkReady(const std::vector<size_t>& params) {
  if (!enabled_) return Status::Ok();
  if (buckets_.empty()) {  // first call of this pass: the gradient layout is fixed now
    TANDEM_RETURN_IF_ERROR(Layout());
    ready_.assign(params_.size(), false);
    for (Bucket& b : buckets_) b.pending = static_cast<int>(b.members.size());
  }
  for (size_t p : params) {
    if (p >= params_.size() || bucket_of_[p] < 0 || ready_[p]) continue;
    ready_[p] = true;
    --buckets_[bucket_of_[p]].pending;
  }
  while (next_ < buckets_.size() && buckets_[next_].pending == 0) {
    TANDEM_RETURN_IF_ERROR(Issue(buckets_[next_++]));
  }
  return Status::Ok();
}

Status GradReducer::Issue(Bucket& bucket) {
  if (overlap_) return IssueOverlapped(bucket);
  if (in_place_) {  // same device: ordered on the context stream, or after a host wait
    Tensor span = options_.flat_grads->Slice(0, bucket.offset, bucket.offset + bucket.numel);
    const bool same_stream = group_.stream() == ctx_.stream();
    if (!same_stream) TANDEM_RETURN_IF_ERROR(ctx_.Synchronize());
    TANDEM_RETURN_IF_ERROR(group_.AllReduce(span, ReduceOp::kSum));
    return same_stream ? Status::Ok() : group_.Synchronize();
  }
  const bool staged_on_host = group_.device() != ctx_.device();
  if (staged_on_host) TANDEM_RETURN_IF_ERROR(ctx_.Synchronize());
  int64_t off = bucket.offset;
  for (size_t k : bucket.members) {
    const Tensor& g = params_[k].grad;
    Tensor dst = staging_.Slice(0, off, off + g.numel());
    TANDEM_RETURN_IF_ERROR(CopyTensor(dst, g.View({g.numel()}), ctx_.stream()));
    off += g.numel();
  }
  Tensor flat = staging_.Slice(0, bucket.offset, bucket.offset + bucket.numel);
  if (staged_on_host || group_.stream() != ctx_.stream()) {
    TANDEM_RETURN_IF_ERROR(ctx_.Synchronize());
  }
  TANDEM_RETURN_IF_ERROR(group_.AllReduce(flat, ReduceOp::kSum));
  if (staged_on_host || group_.stream() != ctx_.stream()) {
    TANDEM_RETURN_IF_ERROR(group_.Synchronize());
  }
  TANDEM_RETURN_IF_ERROR(CopyBack(bucket));
  // The staging buffer is reused by the next bucket.
  return ctx_.Synchronize();
}

// Copy in on the context stream, all-reduce on the group's stream after it; the copy back waits
// for Finish().
Status GradReducer::IssueOverlapped(Bucket& bucket) {
  if (in_place_) {
    TANDEM_RETURN_IF_ERROR(event_->Record(ctx_.stream()));
    TANDEM_RETURN_IF_ERROR(event_->Wait(group_.stream()));
    Tensor span = options_.flat_grads->Slice(0, bucket.offset, bucket.offset + bucket.numel);
    return group_.AllReduce(span, ReduceOp::kSum);
  }
  int64_t off = bucket.offset;
  for (size_t k : bucket.members) {
    const Tensor& g = params_[k].grad;
    Tensor dst = staging_.Slice(0, off, off + g.numel());
    TANDEM_RETURN_IF_ERROR(CopyTensor(dst, g.View({g.numel()}), ctx_.stream()));
    off += g.numel();
  }
  TANDEM_RETURN_IF_ERROR(event_->Record(ctx_.stream()));
  TANDEM_RETURN_IF_ERROR(event_->Wait(group_.stream()));
  Tensor flat = staging_.Slice(0, bucket.offset, bucket.offset + bucket.numel);
  return group_.AllReduce(flat, ReduceOp::kSum);
}

Status GradReducer::CopyBack(const Bucket& bucket) {
  int64_t off = bucket.offset;
  for (size_t k : bucket.members) {
    Tensor g = params_[k].grad.View({params_[k].grad.numel()});
    TANDEM_RETURN_IF_ERROR(CopyTensor(g, staging_.Slice(0, off, off + g.numel()), ctx_.stream()));
    off += g.numel();
  }
  return Status::Ok();
}

Status GradReducer::Finish() {
  if (!enabled_) return Status::Ok();
  if (buckets_.empty()) TANDEM_RETURN_IF_ERROR(MarkReady({}));
  while (next_ < buckets_.size()) TANDEM_RETURN_IF_ERROR(Issue(buckets_[next_++]));
  if (overlap_) {  // the context stream waits for every all-reduce, then copies the sums back
    TANDEM_RETURN_IF_ERROR(event_->Record(group_.stream()));
    TANDEM_RETURN_IF_ERROR(event_->Wait(ctx_.stream()));
    if (!in_place_) {
      for (const Bucket& b : buckets_) TANDEM_RETURN_IF_ERROR(CopyBack(b));
    }
  }
  return ctx_.Synchronize();
}

namespace {

// The sum of squares of each f32 device tensor, as host doubles: one f32 slot per tensor, one
// copy to the host (no wait per tensor).
StatusOr<std::vector<double>> SumSquaresEach(ops::Context& ctx, const std::vector<Tensor>& ts) {
  std::vector<double> out(ts.size(), 0.0);
  if (ts.empty()) return out;
  const int64_t n = static_cast<int64_t>(ts.size());
  TANDEM_ASSIGN_OR_RETURN(Tensor acc, Tensor::Empty({n}, DType::kF32, ctx.allocator()));
  TANDEM_RETURN_IF_ERROR(ops::Fill(ctx, acc, 0.0f));
  for (int64_t j = 0; j < n; ++j) {
    Tensor slot = acc.Slice(0, j, j + 1);
    TANDEM_RETURN_IF_ERROR(ops::SumSquares(ctx, slot, ts[j]));
  }
  TANDEM_ASSIGN_OR_RETURN(Tensor h, CopyToHostBlocking(acc));  // waits for the stream
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<double>(h.data<float>()[j]);
  return out;
}

StatusOr<double> SumOver(ops::Context& ctx, Communicator* comm, double local) {
  if (comm == nullptr || comm->size() == 1) return local;
  Tensor t = Tensor::Cpu({1}, DType::kF32);
  t.data<float>()[0] = static_cast<float>(local);
  TANDEM_RETURN_IF_ERROR(AllReduceAnywhere(ctx, *comm, t, ReduceOp::kSum));
  return static_cast<double>(t.data<float>()[0]);
}

}  // namespace

StatusOr<double> GlobalGradNormSquared(ops::Context& ctx,
                                       const std::vector<model::Parameter>& params,
                                       Communicator* tp) {
  std::vector<size_t> with_grad;
  std::vector<Tensor> grads;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params[i].trainable || !params[i].grad.defined()) continue;
    with_grad.push_back(i);
    grads.push_back(params[i].grad);
  }
  TANDEM_ASSIGN_OR_RETURN(std::vector<double> sums, SumSquaresEach(ctx, grads));
  double local = 0;
  for (size_t j = 0; j < sums.size(); ++j) local += sums[j] / params[with_grad[j]].tp_copies;
  return SumOver(ctx, tp, local);
}

StatusOr<std::unique_ptr<ZeroOptimizer>> ZeroOptimizer::Create(ops::Context& ctx,
                                                               Communicator& group,
                                                               model::LlamaModel& model) {
  Tensor& w = model.weights_flat();
  Tensor& g = model.grads_flat();
  if (!w.defined()) {
    return FailedPreconditionError(
        "parallel.zero = 1 shards the model's flat device buffer of weights, and this model "
        "streams "
        "its layers from host memory (model.offload = host) so it has none");
  }
  if (!g.defined() || g.numel() != w.numel()) {
    return FailedPreconditionError(
        "parallel.zero = 1 needs every model parameter trainable (full fine-tuning); the flat "
        "gradient does not cover the flat weights");
  }
  const int64_t size = group.size();
  if (w.numel() % size != 0) {
    return InvalidArgumentError(StrCat("ZeRO-1: the flat weights (", w.numel(),
                                       " elements) are not a multiple of the group size ", size,
                                       " (set ModelOptions::flat_numel_multiple)"));
  }
  std::unique_ptr<ZeroOptimizer> z(new ZeroOptimizer(ctx, group, model));
  z->shard_numel_ = w.numel() / size;
  z->shard_begin_ = group.rank() * z->shard_numel_;
  const int64_t b = z->shard_begin_, e = b + z->shard_numel_;
  auto& params = model.parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t pb = model.flat_offset(i), pe = pb + params[i].weight.numel();
    if (pe > b && pb < e) z->segments_.push_back({i, std::max(pb, b), std::min(pe, e)});
  }
  auto zeros = [&](Tensor* t) -> Status {
    TANDEM_ASSIGN_OR_RETURN(*t, Tensor::Empty({z->shard_numel_}, DType::kF32, ctx.allocator()));
    return ops::Fill(ctx, *t, 0.0f);
  };
  TANDEM_RETURN_IF_ERROR(zeros(&z->m_));
  TANDEM_RETURN_IF_ERROR(zeros(&z->v_));
  TANDEM_RETURN_IF_ERROR(zeros(&z->grad_shard_));
  if (w.dtype() == DType::kF32) {
    z->master_ = w.Slice(0, b, e);  // the CPU weights are the masters
  } else {
    TANDEM_RETURN_IF_ERROR(zeros(&z->master_));
    for (const Segment& s : z->segments_) {  // from the per-parameter f32 masters
      const Tensor& pm = params[s.param].master;
      const int64_t pb = model.flat_offset(s.param);
      Tensor dst = z->master_.Slice(0, s.begin - b, s.end - b);
      TANDEM_RETURN_IF_ERROR(
          CopyTensor(dst, pm.View({pm.numel()}).Slice(0, s.begin - pb, s.end - pb), ctx.stream()));
    }
  }
  TANDEM_RETURN_IF_ERROR(ctx.Synchronize());
  return z;
}

Status ZeroOptimizer::ReduceScatterGrads() {
  Tensor& g = model_.grads_flat();
  TANDEM_RETURN_IF_ERROR(ctx_.Synchronize());
  if (group_.device() == ctx_.device()) {
    TANDEM_RETURN_IF_ERROR(group_.ReduceScatter(grad_shard_, g, ReduceOp::kSum));
    return group_.Synchronize();
  }
  TANDEM_ASSIGN_OR_RETURN(Tensor hg, CopyToHostBlocking(g));
  Tensor hs = Tensor::Cpu({shard_numel_}, DType::kF32);
  TANDEM_RETURN_IF_ERROR(group_.ReduceScatter(hs, hg, ReduceOp::kSum));
  TANDEM_RETURN_IF_ERROR(CopyTensor(grad_shard_, hs, ctx_.stream()));
  return ctx_.Synchronize();
}

StatusOr<double> ZeroOptimizer::GlobalGradNormSquared(Communicator* tp) {
  std::vector<Tensor> parts;
  for (const Segment& s : segments_) {
    parts.push_back(grad_shard_.Slice(0, s.begin - shard_begin_, s.end - shard_begin_));
  }
  TANDEM_ASSIGN_OR_RETURN(std::vector<double> sums, SumSquaresEach(ctx_, parts));
  double local = 0;
  for (size_t j = 0; j < sums.size(); ++j) {
    local += sums[j] / model_.parameters()[segments_[j].param].tp_copies;
  }
  TANDEM_ASSIGN_OR_RETURN(double over_group, SumOver(ctx_, &group_, local));
  return SumOver(ctx_, tp, over_group);
}

Status ZeroOptimizer::Step(const ops::AdamWParams& base) {
  Tensor& w = model_.weights_flat();
  for (const Segment& s : segments_) {
    const int64_t a = s.begin - shard_begin_, b = s.end - shard_begin_;
    ops::AdamWParams ap = base;
    if (!model_.parameters()[s.param].weight_decay) ap.weight_decay = 0;
    Tensor master = master_.Slice(0, a, b), m = m_.Slice(0, a, b), v = v_.Slice(0, a, b);
    Tensor weights = w.dtype() == DType::kF32 ? Tensor() : w.Slice(0, s.begin, s.end);
    TANDEM_RETURN_IF_ERROR(ops::AdamW(ctx_, master, m, v, weights, grad_shard_.Slice(0, a, b), ap));
  }
  Tensor mine = w.Slice(0, shard_begin_, shard_begin_ + shard_numel_);
  return AllGatherAnywhere(ctx_, group_, w, mine);
}

Status ZeroOptimizer::GatherMasters() {
  Tensor& w = model_.weights_flat();
  if (w.dtype() == DType::kF32) return Status::Ok();
  TANDEM_ASSIGN_OR_RETURN(Tensor all, Tensor::Empty({w.numel()}, DType::kF32, ctx_.allocator()));
  TANDEM_RETURN_IF_ERROR(AllGatherAnywhere(ctx_, group_, all, master_));
  auto& params = model_.parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    Tensor& pm = params[i].master;
    if (!pm.defined()) continue;
    const int64_t pb = model_.flat_offset(i);
    Tensor dst = pm.View({pm.numel()});
    TANDEM_RETURN_IF_ERROR(CopyTensor(dst, all.Slice(0, pb, pb + pm.numel()), ctx_.stream()));
  }
  return ctx_.Synchronize();
}

Status ZeroOptimizer::ReloadMasters() {
  if (model_.weights_flat().dtype() == DType::kF32) return Status::Ok();
  auto& params = model_.parameters();
  for (const Segment& s : segments_) {
    const Tensor& pm = params[s.param].master;
    const int64_t pb = model_.flat_offset(s.param);
    Tensor dst = master_.Slice(0, s.begin - shard_begin_, s.end - shard_begin_);
    TANDEM_RETURN_IF_ERROR(
        CopyTensor(dst, pm.View({pm.numel()}).Slice(0, s.begin - pb, s.end - pb), ctx_.stream()));
  }
  return ctx_.Synchronize();
}

Status ZeroOptimizer::RestoreFromShard() {
  Tensor& w = model_.weights_flat();
  if (w.dtype() == DType::kF32) {  // the shard is a view of the weights
    Tensor mine = w.Slice(0, shard_begin_, shard_begin_ + shard_numel_);
    return AllGatherAnywhere(ctx_, group_, w, mine);
  }
  TANDEM_RETURN_IF_ERROR(GatherMasters());
  for (model::Parameter& p : model_.parameters()) {
    if (!p.master.defined() || p.weight.storage() == p.master.storage()) continue;
    TANDEM_RETURN_IF_ERROR(ops::Cast(ctx_, p.weight, p.master));
  }
  return ctx_.Synchronize();
}

std::vector<ZeroOptimizer::StateView> ZeroOptimizer::StateViews() {
  std::vector<StateView> views;
  for (const Segment& s : segments_) {
    const int64_t a = s.begin - shard_begin_, b = s.end - shard_begin_;
    const int64_t pb = model_.flat_offset(s.param);
    views.push_back({s.param, s.begin - pb, s.end - pb, master_.Slice(0, a, b), m_.Slice(0, a, b),
                     v_.Slice(0, a, b)});
  }
  return views;
}

}  // namespace tandem::parallel
