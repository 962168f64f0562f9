// LoraAdapter: parameters (flat master / compute / gradient buffers), PEFT initialization, merge.
#include <algorithm>
#include <cmath>

#include "core/rng.h"
#include "ops/ops.h"
#include "peft/lora.h"

namespace tandem::peft {
namespace {

// Parameters start at multiples of 64 elements (256 bytes in f32), as the model's groups.
constexpr int64_t kAlignElems = 64;
int64_t AlignUp(int64_t n) { return (n + kAlignElems - 1) / kAlignElems * kAlignElems; }

}  // namespace

LoraAdapter::LoraAdapter(ops::Context& ctx, const model::LlamaConfig& base,
                         const LoraConfig& config)
    : ctx_(ctx),
      base_(base),
      config_(config),
      compute_dtype_(ctx.is_cuda() ? DType::kBF16 : DType::kF32) {}

LoraAdapter::~LoraAdapter() = default;

StatusOr<std::unique_ptr<LoraAdapter>> LoraAdapter::Create(ops::Context& ctx,
                                                           const model::LlamaConfig& base,
                                                           const LoraConfig& config) {
  TANDEM_RETURN_IF_ERROR(model::ValidateLlamaConfig(base, "LoraAdapter::Create base config"));
  std::unique_ptr<LoraAdapter> a(new LoraAdapter(ctx, base, config));
  TANDEM_ASSIGN_OR_RETURN(a->targets_, ResolveLoraTargets(config, base));
  a->index_.assign(base.num_hidden_layers * model::kNumProjections, -1);
  for (size_t i = 0; i < a->targets_.size(); ++i) {
    const LoraTarget& t = a->targets_[i];
    a->index_[t.layer * model::kNumProjections + static_cast<int>(t.proj)] = static_cast<int>(i);
  }
  TANDEM_RETURN_IF_ERROR(a->Allocate());
  TANDEM_RETURN_IF_ERROR(a->InitPeft(config.init_seed));
  TANDEM_RETURN_IF_ERROR(a->ZeroGrads());
  return a;
}

int LoraAdapter::Find(int64_t layer, model::Projection proj) const {
  if (layer < 0 || layer >= base_.num_hidden_layers) return -1;
  return index_[layer * model::kNumProjections + static_cast<int>(proj)];
}

Status LoraAdapter::Allocate() {
  std::vector<int64_t> offsets;
  int64_t total = 0;
  for (const LoraTarget& t : targets_) {
    for (const Shape& shape : {Shape{t.rank, t.in}, Shape{t.out, t.rank}}) {
      offsets.push_back(total);
      total = AlignUp(total + ShapeNumel(shape));
    }
  }
  TANDEM_ASSIGN_OR_RETURN(master_flat_, Tensor::Empty({total}, DType::kF32, ctx_.allocator()));
  TANDEM_ASSIGN_OR_RETURN(grad_flat_, Tensor::Empty({total}, DType::kF32, ctx_.allocator()));
  if (compute_dtype_ == DType::kF32) {
    weight_flat_ = master_flat_;
  } else {
    TANDEM_ASSIGN_OR_RETURN(weight_flat_, Tensor::Empty({total}, compute_dtype_, ctx_.allocator()));
  }
  auto view = [](const Tensor& flat, int64_t offset, const Shape& shape) {
    return flat.Slice(0, offset, offset + ShapeNumel(shape)).View(shape);
  };
  for (size_t i = 0; i < targets_.size(); ++i) {
    const LoraTarget& t = targets_[i];
    const char* names[2] = {"lora_A", "lora_B"};
    const Shape shapes[2] = {{t.rank, t.in}, {t.out, t.rank}};
    for (int k = 0; k < 2; ++k) {
      const int64_t off = offsets[2 * i + k];
      model::Parameter p;
      p.name = StrCat("base_model.model.", t.module, ".", names[k], ".weight");
      p.master = view(master_flat_, off, shapes[k]);
      p.weight = view(weight_flat_, off, shapes[k]);
      p.grad = view(grad_flat_, off, shapes[k]);
      p.trainable = true;
      p.weight_decay = true;
      params_.push_back(std::move(p));
    }
  }
  return Status::Ok();
}

Status LoraAdapter::InitPeft(uint64_t seed) {
  const uint64_t key = DeriveSeed(seed, 0, "lora_init");
  for (size_t i = 0; i < targets_.size(); ++i) {
    const LoraTarget& t = targets_[i];
    Tensor a = Tensor::Cpu({t.rank, t.in}, DType::kF32);
    Rng rng(key, /*stream=*/static_cast<uint64_t>(t.layer * model::kNumProjections +
                                                  static_cast<int>(t.proj)));
    const float bound = static_cast<float>(1.0 / std::sqrt(static_cast<double>(t.in)));
    for (int64_t j = 0; j < a.numel(); ++j)
      a.data<float>()[j] = bound * (2.0f * rng.Uniform() - 1.0f);
    TANDEM_RETURN_IF_ERROR(SetFromHost(2 * i, a));
    TANDEM_RETURN_IF_ERROR(SetFromHost(2 * i + 1, Tensor::CpuZeros({t.out, t.rank}, DType::kF32)));
  }
  return Status::Ok();
}

Status LoraAdapter::SetFromHost(size_t param, const Tensor& host_f32) {
  TANDEM_CHECK(param < params_.size());
  model::Parameter& p = params_[param];
  TANDEM_RETURN_IF_ERROR(ExpectShape(host_f32, p.master.shape(), p.name.c_str()));
  TANDEM_RETURN_IF_ERROR(ExpectDType(host_f32, DType::kF32, p.name.c_str()));
  TANDEM_RETURN_IF_ERROR(CopyTensor(p.master, host_f32, ctx_.stream()));
  if (p.weight.storage() != p.master.storage()) {
    TANDEM_RETURN_IF_ERROR(ops::Cast(ctx_, p.weight, p.master));
  }
  return ctx_.Synchronize();  // the caller may reuse host_f32
}

StatusOr<Tensor> LoraAdapter::ToHost(size_t param) const {
  TANDEM_CHECK(param < params_.size());
  TANDEM_RETURN_IF_ERROR(ctx_.Synchronize());
  return CopyToHostBlocking(params_[param].master);
}

Status LoraAdapter::ZeroGrads() { return ops::Fill(ctx_, grad_flat_, 0.0f); }

Status LoraAdapter::Merge(model::LlamaModel& model) const { return AddDelta(model, 1.0f); }
Status LoraAdapter::Unmerge(model::LlamaModel& model) const { return AddDelta(model, -1.0f); }

// W += sign * scale * B A, computed from the f32 masters: in place when W (or its master) is f32,
// else through an f32 copy of W that is cast back.
Status LoraAdapter::AddDelta(model::LlamaModel& model, float sign) const {
  const model::LlamaConfig& mc = model.config();
  if (mc.num_hidden_layers != base_.num_hidden_layers || mc.hidden_size != base_.hidden_size ||
      mc.intermediate_size != base_.intermediate_size ||
      mc.num_attention_heads != base_.num_attention_heads) {
    return InvalidArgumentError(StrCat("LoraAdapter merge: the model (", mc.num_hidden_layers,
                                       " layers, hidden ", mc.hidden_size,
                                       ") is not the adapter's base (", base_.num_hidden_layers,
                                       " layers, hidden ", base_.hidden_size, ")"));
  }
  std::vector<model::Parameter>& params = model.parameters();
  for (size_t i = 0; i < targets_.size(); ++i) {
    const LoraTarget& t = targets_[i];
    const std::string name = t.module + ".weight";
    auto it = std::find_if(params.begin(), params.end(),
                           [&](const model::Parameter& p) { return p.name == name; });
    if (it == params.end()) return NotFoundError(StrCat("LoraAdapter merge: no parameter ", name));
    model::Parameter& w = *it;
    TANDEM_RETURN_IF_ERROR(ExpectShape(w.weight, {t.out, t.in}, name.c_str()));
    const float alpha = sign * t.scale;
    const Tensor& A = params_[2 * i].master;      // [r, in]
    const Tensor& B = params_[2 * i + 1].master;  // [out, r]
    if (w.weight.dtype() == DType::kF32) {
      TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, w.weight, B, A, false, false, alpha, 1.0f));
      continue;
    }
    const bool own_master = w.master.defined() && w.master.storage() != w.weight.storage();
    Tensor acc = w.master;
    if (!own_master) {
      TANDEM_ASSIGN_OR_RETURN(acc, Tensor::Empty(w.weight.shape(), DType::kF32, ctx_.allocator()));
      TANDEM_RETURN_IF_ERROR(ops::Cast(ctx_, acc, w.weight));
    }
    TANDEM_RETURN_IF_ERROR(ops::Matmul(ctx_, acc, B, A, false, false, alpha, 1.0f));
    TANDEM_RETURN_IF_ERROR(ops::Cast(ctx_, w.weight, acc));
  }
  return ctx_.Synchronize();
}

}  // namespace tandem::peft
