// S2ftAdapter: the trainable blocks, the hooks on a permuted base, merge (peft/s2ft.h).
#include "ops/ops.h"
#include "peft/internal/s2ft_weights.h"
#include "peft/s2ft.h"

namespace tandem::peft {
namespace {

constexpr int64_t kAlignElems = 64;  // blocks start at multiples of 256 bytes (f32), as LoRA's
int64_t AlignUp(int64_t n) { return (n + kAlignElems - 1) / kAlignElems * kAlignElems; }

bool SameArchitecture(const model::LlamaConfig& a, const model::LlamaConfig& b) {
  const internal::S2ftDims x = internal::DimsOf(a), y = internal::DimsOf(b);
  return x.C == y.C && x.F == y.F && x.L == y.L && x.Hq == y.Hq && x.Hkv == y.Hkv && x.D == y.D;
}

}  // namespace

S2ftAdapter::S2ftAdapter(ops::Context& ctx, const model::LlamaConfig& base,
                         const S2ftConfig& config)
    : ctx_(ctx), base_(base), config_(config) {}

S2ftAdapter::~S2ftAdapter() = default;

StatusOr<std::unique_ptr<S2ftAdapter>> S2ftAdapter::Create(ops::Context& ctx,
                                                           const model::LlamaConfig& base,
                                                           const S2ftConfig& config,
                                                           S2ftSelection selection) {
  TANDEM_RETURN_IF_ERROR(model::ValidateLlamaConfig(base, "S2ftAdapter::Create base config"));
  TANDEM_RETURN_IF_ERROR(ValidateS2ftConfig(config));
  TANDEM_RETURN_IF_ERROR(NormalizeS2ftSelection(selection, base, "S2ftAdapter::Create"));
  std::unique_ptr<S2ftAdapter> a(new S2ftAdapter(ctx, base, config));
  a->selection_ = std::move(selection);
  a->blocks_ = S2ftBlocksFor(a->selection_, base, config.coupled);
  a->index_.assign(base.num_hidden_layers * model::kNumProjections, -1);
  for (size_t i = 0; i < a->blocks_.size(); ++i) {
    const S2ftBlock& b = a->blocks_[i];
    a->index_[b.layer * model::kNumProjections + static_cast<int>(b.proj)] = static_cast<int>(i);
  }
  TANDEM_RETURN_IF_ERROR(a->Allocate());
  TANDEM_RETURN_IF_ERROR(ops::Fill(ctx, a->master_flat_, 0.0f));
  if (a->weight_flat_.storage() != a->master_flat_.storage()) {
    TANDEM_RETURN_IF_ERROR(ops::Fill(ctx, a->weight_flat_, 0.0f));
  }
  TANDEM_RETURN_IF_ERROR(a->ZeroGrads());
  TANDEM_RETURN_IF_ERROR(ctx.Synchronize());
  return a;
}

Status S2ftAdapter::Allocate() {
  std::vector<int64_t> offsets;
  int64_t total = 0;
  for (const S2ftBlock& b : blocks_) {
    offsets.push_back(total);
    total = AlignUp(total + ShapeNumel(b.shape));
  }
  total = std::max<int64_t>(total, 1);
  TANDEM_ASSIGN_OR_RETURN(master_flat_, Tensor::Empty({total}, DType::kF32, ctx_.allocator()));
  TANDEM_ASSIGN_OR_RETURN(grad_flat_, Tensor::Empty({total}, DType::kF32, ctx_.allocator()));
  const DType compute = ctx_.is_cuda() ? DType::kBF16 : DType::kF32;
  if (compute == DType::kF32) {
    weight_flat_ = master_flat_;
  } else {
    TANDEM_ASSIGN_OR_RETURN(weight_flat_, Tensor::Empty({total}, compute, ctx_.allocator()));
  }
  auto view = [](const Tensor& flat, int64_t offset, const Shape& shape) {
    return flat.Slice(0, offset, offset + ShapeNumel(shape)).View(shape);
  };
  for (size_t i = 0; i < blocks_.size(); ++i) {
    model::Parameter p;
    p.name = blocks_[i].name;
    p.master = view(master_flat_, offsets[i], blocks_[i].shape);
    p.weight = view(weight_flat_, offsets[i], blocks_[i].shape);
    p.grad = view(grad_flat_, offsets[i], blocks_[i].shape);
    params_.push_back(std::move(p));
  }
  return Status::Ok();
}

int S2ftAdapter::Find(int64_t layer, model::Projection proj) const {
  if (layer < 0 || layer >= base_.num_hidden_layers) return -1;
  return index_[layer * model::kNumProjections + static_cast<int>(proj)];
}

int64_t S2ftAdapter::num_trainable() const {
  int64_t n = 0;
  for (const S2ftBlock& b : blocks_) n += ShapeNumel(b.shape);
  return n;
}

Status S2ftAdapter::SetFromHost(size_t block, const Tensor& host_f32) {
  TANDEM_CHECK(block < params_.size());
  model::Parameter& p = params_[block];
  TANDEM_RETURN_IF_ERROR(ExpectShape(host_f32, p.master.shape(), p.name.c_str()));
  TANDEM_RETURN_IF_ERROR(ExpectDType(host_f32, DType::kF32, p.name.c_str()));
  TANDEM_RETURN_IF_ERROR(CopyTensor(p.master, host_f32, ctx_.stream()));
  if (p.weight.storage() != p.master.storage()) {
    TANDEM_RETURN_IF_ERROR(ops::Cast(ctx_, p.weight, p.master));
  }
  return ctx_.Synchronize();
}

StatusOr<Tensor> S2ftAdapter::ToHost(size_t block) const {
  TANDEM_CHECK(block < params_.size());
  return CopyToHostOn(params_[block].master, ctx_.stream());
}

Status S2ftAdapter::ZeroGrads() { return ops::Fill(ctx_, grad_flat_, 0.0f); }

Status S2ftAdapter::Merge(model::LlamaModel& model, S2ftBaseOrder order) const {
  return AddDelta(model, order, 1.0f);
}
Status S2ftAdapter::Unmerge(model::LlamaModel& model, S2ftBaseOrder order) const {
  return AddDelta(model, order, -1.0f);
}

// Through the host in f32: W (its master when it has one) += sign * D at the block's positions.
Status S2ftAdapter::AddDelta(model::LlamaModel& model, S2ftBaseOrder order, float sign) const {
  if (!SameArchitecture(model.config(), base_)) {
    return InvalidArgumentError(
        StrCat("S2ftAdapter merge: the model (", model.config().num_hidden_layers,
               " layers, hidden ", model.config().hidden_size, ") is not the adapter's base (",
               base_.num_hidden_layers, " layers, hidden ", base_.hidden_size, ")"));
  }
  for (size_t i = 0; i < blocks_.size(); ++i) {
    const S2ftBlock& b = blocks_[i];
    TANDEM_ASSIGN_OR_RETURN(model::Parameter * p,
                            internal::FindProjectionWeight(model, b.layer, b.proj));
    TANDEM_ASSIGN_OR_RETURN(Tensor w, internal::ReadWeightF32(ctx_, *p));
    TANDEM_ASSIGN_OR_RETURN(const Tensor d, ToHost(i));
    const int64_t cols = w.dim(1), s = static_cast<int64_t>(b.indices.size());
    float* pw = w.data<float>();
    const float* pd = d.data<float>();
    for (int64_t j = 0; j < s; ++j) {
      const int64_t at = order == S2ftBaseOrder::kPermuted ? j : b.indices[j];
      if (b.axis == S2ftAxis::kColumns) {
        for (int64_t r = 0; r < w.dim(0); ++r) pw[r * cols + at] += sign * pd[r * s + j];
      } else {
        for (int64_t c = 0; c < cols; ++c) pw[at * cols + c] += sign * pd[j * cols + c];
      }
    }
    TANDEM_RETURN_IF_ERROR(internal::WriteWeightF32(ctx_, *p, w));
  }
  return Status::Ok();
}

Status S2ftAdapter::BeginBatch(const model::Batch& batch, bool training) {
  if (!batch.adapter_ids.defined()) return Status::Ok();
  const int32_t* ids = batch.adapter_ids.data<int32_t>();
  for (int64_t b = 0; b < batch.adapter_ids.numel(); ++b) {
    if (ids[b] == 0) continue;
    return InvalidArgumentError(StrCat("batch.adapter_ids[", b, "] = ", ids[b],
                                       ": an S2ftAdapter serves whole batches (ids must be 0); "
                                       "merge S2FT adapters to mix them with others"));
  }
  return Status::Ok();
}

Status S2ftAdapter::ProjectionForward(int64_t layer, model::Projection proj, const Tensor& x,
                                      Tensor& y) {
  const int i = Find(layer, proj);
  if (i < 0) return Status::Ok();
  const S2ftBlock& b = blocks_[i];
  const int64_t s = static_cast<int64_t>(b.indices.size());
  const Tensor& D = params_[i].weight;
  if (b.axis == S2ftAxis::kColumns) {  // y += x[:, :s] D^T, D [out, s]
    return ops::Matmul(ctx_, y, x.Slice(1, 0, s), D, false, true, 1.0f, 1.0f);
  }
  Tensor ys = y.Slice(1, 0, s);  // y[:, :s] += x D^T, D [s, in]
  return ops::Matmul(ctx_, ys, x, D, false, true, 1.0f, 1.0f);
}

Status S2ftAdapter::ProjectionBackward(int64_t layer, model::Projection proj, const Tensor& x,
                                       const Tensor& dy, Tensor& dx) {
  const int i = Find(layer, proj);
  if (i < 0) return Status::Ok();
  const S2ftBlock& b = blocks_[i];
  const int64_t s = static_cast<int64_t>(b.indices.size());
  const model::Parameter& p = params_[i];
  Tensor dD = p.grad;
  if (b.axis == S2ftAxis::kColumns) {
    const Tensor xs = x.Slice(1, 0, s);  // [N, s]: the only activations the block needs
    if (p.trainable) TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, dD, dy, xs, true, false, 1.0f, 1.0f));
    if (!dx.defined()) return Status::Ok();
    Tensor dxs = dx.Slice(1, 0, s);
    return ops::Matmul(ctx_, dxs, dy, p.weight, false, false, 1.0f, 1.0f);
  }
  const Tensor dys = dy.Slice(1, 0, s);  // [N, s]
  if (p.trainable) TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, dD, dys, x, true, false, 1.0f, 1.0f));
  if (!dx.defined()) return Status::Ok();
  return ops::Matmul(ctx_, dx, dys, p.weight, false, false, 1.0f, 1.0f);
}

StatusOr<std::unique_ptr<S2ftAdapter>> PrepareS2ft(ops::Context& ctx, model::LlamaModel& model,
                                                   const S2ftConfig& config) {
  TANDEM_ASSIGN_OR_RETURN(S2ftSelection selection, SelectS2ft(ctx, config, model));
  TANDEM_ASSIGN_OR_RETURN(auto adapter,
                          S2ftAdapter::Create(ctx, model.config(), config, std::move(selection)));
  TANDEM_RETURN_IF_ERROR(PermuteS2ftBase(ctx, model, adapter->selection()));
  return adapter;
}

}  // namespace tandem::peft
