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

// Rows [offset, offset + local[0]) (dim 0) or columns [offset, offset + local[1]) (dim 1) of the
// host f32 matrix `whole`, as a contiguous host tensor.
Tensor SliceHost(const Tensor& whole, int dim, int64_t offset, const Shape& local) {
  Tensor out = Tensor::Cpu(local, DType::kF32);
  const int64_t cols = whole.dim(1);
  for (int64_t i = 0; i < local[0]; ++i) {
    const float* src = whole.data<float>() + (dim == 0 ? (offset + i) * cols : i * cols + offset);
    std::copy(src, src + local[1], out.data<float>() + i * local[1]);
  }
  return out;
}

}  // namespace

StatusOr<LoraSlice> LoraSliceFor(const model::LlamaConfig& base, model::Projection proj,
                                 int tp_rank, int tp_size) {
  const int64_t tp = tp_size, r = tp_rank;
  const int64_t Hq = base.num_attention_heads;
  const int64_t Hkv = base.num_key_value_heads > 0 ? base.num_key_value_heads : Hq;
  const int64_t F = base.intermediate_size;
  if (tp < 1 || r < 0 || r >= tp) {
    return InvalidArgumentError(
        StrCat("LoraParallel: expected 0 <= tp_rank < tp_size, found ", tp_rank, "/", tp_size));
  }
  if (Hq % tp != 0 || F % tp != 0 || (Hkv % tp != 0 && tp % Hkv != 0)) {
    return InvalidArgumentError(
        StrCat("LoRA under tensor parallelism over ", tp, " ranks needs num_attention_heads (", Hq,
               ") and intermediate_size (", F, ") divisible by tp, and num_key_value_heads (", Hkv,
               ") a multiple or a divisor of tp"));
  }
  const auto [in, out] = ProjectionShape(base, proj);
  LoraSlice s;
  s.in = in;
  s.out = out;
  switch (proj) {
    case model::Projection::kO:
    case model::Projection::kDown:  // row parallel: the input columns of this rank's heads / ffn
      s.row_parallel = true;
      s.in = in / tp;
      s.in_offset = r * s.in;
      break;
    case model::Projection::kK:
    case model::Projection::kV: {  // a kv head may be shared by tp / Hkv ranks
      const int64_t share = Hkv >= tp ? 1 : tp / Hkv;
      const int64_t heads = Hkv >= tp ? Hkv / tp : 1;
      const int64_t first = Hkv >= tp ? r * heads : r / share;
      const int64_t D = out / Hkv;  // head_dim
      s.out = heads * D;
      s.out_offset = first * D;
      s.out_copies = static_cast<int>(share);
      break;
    }
    default:  // q, gate, up
      s.out = out / tp;
      s.out_offset = r * s.out;
      break;
  }
  return s;
}

LoraAdapter::LoraAdapter(ops::Context& ctx, const model::LlamaConfig& base,
                         const LoraConfig& config, const LoraParallel& parallel)
    : ctx_(ctx),
      base_(base),
      config_(config),
      compute_dtype_(ctx.is_cuda() ? DType::kBF16 : DType::kF32),
      parallel_(parallel) {}

LoraAdapter::~LoraAdapter() = default;

StatusOr<std::unique_ptr<LoraAdapter>> LoraAdapter::Create(ops::Context& ctx,
                                                           const model::LlamaConfig& base,
                                                           const LoraConfig& config,
                                                           const LoraParallel& parallel) {
  TANDEM_RETURN_IF_ERROR(model::ValidateLlamaConfig(base, "LoraAdapter::Create base config"));
  if (parallel.tp_size > 1 && parallel.hooks == nullptr) {
    return InvalidArgumentError("LoraParallel: tp_size > 1 needs the model's ParallelHooks");
  }
  std::unique_ptr<LoraAdapter> a(new LoraAdapter(ctx, base, config, parallel));
  TANDEM_ASSIGN_OR_RETURN(a->targets_, ResolveLoraTargets(config, base));
  a->index_.assign(base.num_hidden_layers * model::kNumProjections, -1);
  for (size_t i = 0; i < a->targets_.size(); ++i) {
    const LoraTarget& t = a->targets_[i];
    a->index_[t.layer * model::kNumProjections + static_cast<int>(t.proj)] = static_cast<int>(i);
    TANDEM_ASSIGN_OR_RETURN(LoraSlice slice,
                            LoraSliceFor(base, t.proj, parallel.tp_rank, parallel.tp_size));
    a->slices_.push_back(slice);
  }
  TANDEM_RETURN_IF_ERROR(a->Allocate());
  TANDEM_RETURN_IF_ERROR(a->InitPeft(config.init_seed));
  TANDEM_RETURN_IF_ERROR(a->ZeroGrads());
  return a;
}

std::string LoraParameterName(const LoraTarget& target, bool b) {
  return StrCat("base_model.model.", target.module, b ? ".lora_B" : ".lora_A", ".weight");
}

int LoraAdapter::Find(int64_t layer, model::Projection proj) const {
  if (layer < 0 || layer >= base_.num_hidden_layers) return -1;
  return index_[layer * model::kNumProjections + static_cast<int>(proj)];
}

Status LoraAdapter::Allocate() {
  std::vector<int64_t> offsets;
  int64_t total = 0;
  for (size_t i = 0; i < targets_.size(); ++i) {
    const LoraTarget& t = targets_[i];
    for (const Shape& shape : {Shape{t.rank, slices_[i].in}, Shape{slices_[i].out, t.rank}}) {
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
  const bool tp = parallel_.tp_size > 1;
  for (size_t i = 0; i < targets_.size(); ++i) {
    const LoraTarget& t = targets_[i];
    const LoraSlice& sl = slices_[i];
    const Shape shapes[2] = {{t.rank, sl.in}, {sl.out, t.rank}};
    const Shape logical[2] = {{t.rank, t.in}, {t.out, t.rank}};
    for (int k = 0; k < 2; ++k) {
      const int64_t off = offsets[2 * i + k];
      model::Parameter p;
      p.name = LoraParameterName(t, k == 1);
      p.master = view(master_flat_, off, shapes[k]);
      p.weight = view(weight_flat_, off, shapes[k]);
      p.grad = view(grad_flat_, off, shapes[k]);
      p.trainable = true;
      p.weight_decay = true;
      p.logical_shape = logical[k];
      // Sliced: A of a row-parallel projection (dim 1), B of a column-parallel one (dim 0).
      const bool sliced = k == 0 ? sl.row_parallel : !sl.row_parallel;
      if (tp && sliced) {
        p.tp_dim = k == 0 ? 1 : 0;
        p.tp_offset = k == 0 ? sl.in_offset : sl.out_offset;
        p.tp_copies = k == 0 ? 1 : sl.out_copies;
      } else if (tp) {
        p.tp_copies = parallel_.tp_size;  // replicated on every tp rank
      }
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
    TANDEM_RETURN_IF_ERROR(SetFromLogicalHost(2 * i, a));
    TANDEM_RETURN_IF_ERROR(
        SetFromLogicalHost(2 * i + 1, Tensor::CpuZeros({t.out, t.rank}, DType::kF32)));
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

Status LoraAdapter::SetFromLogicalHost(size_t param, const Tensor& host_f32) {
  TANDEM_CHECK(param < params_.size());
  const model::Parameter& p = params_[param];
  TANDEM_RETURN_IF_ERROR(ExpectShape(host_f32, p.logical_shape, p.name.c_str()));
  TANDEM_RETURN_IF_ERROR(ExpectDType(host_f32, DType::kF32, p.name.c_str()));
  if (p.tp_dim < 0) return SetFromHost(param, host_f32);
  if (!host_f32.device().is_cpu() || !host_f32.is_contiguous()) {
    return InvalidArgumentError(
        StrCat(p.name, ": expected a contiguous host tensor, found ", host_f32.DebugString()));
  }
  return SetFromHost(param, SliceHost(host_f32, p.tp_dim, p.tp_offset, p.master.shape()));
}

StatusOr<Tensor> LoraAdapter::ToHost(size_t param) const {
  TANDEM_CHECK(param < params_.size());
  return CopyToHostOn(params_[param].master, ctx_.stream());
}

// Every tp rank's slice, all-gathered on the host, placed at that rank's offset (ranks sharing a
// kv head write the same rows).
StatusOr<Tensor> LoraAdapter::GatherToHost(size_t param, bool grad) const {
  TANDEM_CHECK(param < params_.size());
  const model::Parameter& p = params_[param];
  TANDEM_ASSIGN_OR_RETURN(Tensor mine, CopyToHostOn(grad ? p.grad : p.master, ctx_.stream()));
  if (p.tp_dim < 0) return mine;
  const int tp = parallel_.tp_size;
  const int64_t n = mine.numel();
  Tensor all = Tensor::Cpu({tp * n}, DType::kF32);
  TANDEM_RETURN_IF_ERROR(parallel_.hooks->TpAllGather(all, mine.View({n})));
  Tensor out = Tensor::Cpu(p.logical_shape, DType::kF32);
  const LoraTarget& t = targets_[param / 2];
  const int64_t rows = mine.dim(0), cols = mine.dim(1), out_cols = p.logical_shape[1];
  for (int r = 0; r < tp; ++r) {
    TANDEM_ASSIGN_OR_RETURN(LoraSlice sl, LoraSliceFor(base_, t.proj, r, tp));
    const int64_t offset = p.tp_dim == 0 ? sl.out_offset : sl.in_offset;
    const float* src = all.data<float>() + r * n;
    for (int64_t i = 0; i < rows; ++i) {
      float* dst =
          out.data<float>() + (p.tp_dim == 0 ? (offset + i) * out_cols : i * out_cols + offset);
      std::copy(src + i * cols, src + (i + 1) * cols, dst);
    }
  }
  return out;
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
    const LoraSlice& sl = slices_[i];  // W's slice on this rank matches B_local A_local
    TANDEM_RETURN_IF_ERROR(ExpectShape(w.weight, {sl.out, sl.in}, name.c_str()));
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
