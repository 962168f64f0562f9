// Host f32 access to projection weights (peft/internal/s2ft_weights.h).
#include "peft/internal/s2ft_weights.h"

#include <cstring>

#include "ops/ops.h"
#include "peft/lora.h"

namespace tandem::peft::internal {

S2ftDims DimsOf(const model::LlamaConfig& base) {
  S2ftDims d;
  d.C = base.hidden_size;
  d.F = base.intermediate_size;
  d.L = base.num_hidden_layers;
  d.Hq = base.num_attention_heads;
  d.Hkv = base.num_key_value_heads > 0 ? base.num_key_value_heads : d.Hq;
  d.D = base.head_dim > 0 ? base.head_dim : (d.Hq > 0 ? d.C / d.Hq : 0);
  d.g = d.Hkv > 0 ? d.Hq / d.Hkv : 1;
  return d;
}

StatusOr<model::Parameter*> FindProjectionWeight(model::LlamaModel& model, int64_t layer,
                                                 model::Projection proj) {
  const std::string name = ProjectionModuleName(layer, proj) + ".weight";
  for (model::Parameter& p : model.parameters()) {
    if (p.name == name) return &p;
  }
  return NotFoundError(StrCat("the model has no parameter ", name));
}

namespace {
bool HasOwnMaster(const model::Parameter& p) {
  return p.master.defined() && p.master.storage() != p.weight.storage();
}
}  // namespace

StatusOr<Tensor> ReadWeightF32(ops::Context& ctx, const model::Parameter& p) {
  const Tensor& src = HasOwnMaster(p) ? p.master : p.weight;
  TANDEM_ASSIGN_OR_RETURN(Tensor host, CopyToHostOn(src, ctx.stream()));
  if (host.dtype() != DType::kF32) {
    TANDEM_ASSIGN_OR_RETURN(host, CastCpu(host, DType::kF32));
  }
  return host;
}

Status WriteWeightF32(ops::Context& ctx, model::Parameter& p, const Tensor& host_f32) {
  TANDEM_RETURN_IF_ERROR(ExpectShape(host_f32, p.weight.shape(), p.name.c_str()));
  TANDEM_RETURN_IF_ERROR(ExpectDType(host_f32, DType::kF32, p.name.c_str()));
  if (HasOwnMaster(p)) {
    TANDEM_RETURN_IF_ERROR(CopyTensor(p.master, host_f32, ctx.stream()));
    TANDEM_RETURN_IF_ERROR(ops::Cast(ctx, p.weight, p.master));
    return ctx.Synchronize();
  }
  Tensor src = host_f32;
  if (p.weight.dtype() != DType::kF32) {
    TANDEM_ASSIGN_OR_RETURN(src, CastCpu(host_f32, p.weight.dtype()));
  }
  TANDEM_RETURN_IF_ERROR(CopyTensor(p.weight, src, ctx.stream()));
  return ctx.Synchronize();  // src is a host temporary
}

void PermuteRowsHost(Tensor& out, const Tensor& in, const std::vector<int64_t>& perm, int64_t unit,
                     bool inverse) {
  TANDEM_CHECK(in.shape() == out.shape() && in.ndim() == 2);
  const int64_t cols = in.dim(1), span = unit * cols;
  TANDEM_CHECK(static_cast<int64_t>(perm.size()) * unit == in.dim(0));
  const float* src = in.data<float>();
  float* dst = out.data<float>();
  for (size_t j = 0; j < perm.size(); ++j) {
    const int64_t from = inverse ? static_cast<int64_t>(j) : perm[j];
    const int64_t to = inverse ? perm[j] : static_cast<int64_t>(j);
    std::memcpy(dst + to * span, src + from * span, sizeof(float) * span);
  }
}

void PermuteColsHost(Tensor& out, const Tensor& in, const std::vector<int64_t>& perm, int64_t unit,
                     bool inverse) {
  TANDEM_CHECK(in.shape() == out.shape() && in.ndim() == 2);
  const int64_t rows = in.dim(0), cols = in.dim(1);
  TANDEM_CHECK(static_cast<int64_t>(perm.size()) * unit == cols);
  const float* src = in.data<float>();
  float* dst = out.data<float>();
  for (int64_t r = 0; r < rows; ++r) {
    for (size_t j = 0; j < perm.size(); ++j) {
      const int64_t from = inverse ? static_cast<int64_t>(j) : perm[j];
      const int64_t to = inverse ? perm[j] : static_cast<int64_t>(j);
      std::memcpy(dst + r * cols + to * unit, src + r * cols + from * unit, sizeof(float) * unit);
    }
  }
}

std::vector<int64_t> SelectedFirstOrder(const std::vector<int64_t>& selected, int64_t n) {
  std::vector<int64_t> order = selected;
  std::vector<bool> taken(n, false);
  for (int64_t i : selected) taken[i] = true;
  for (int64_t i = 0; i < n; ++i) {
    if (!taken[i]) order.push_back(i);
  }
  return order;
}

}  // namespace tandem::peft::internal
