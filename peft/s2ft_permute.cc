// S²FT co-permutation of the base weights (peft/s2ft.h): each layer's selected kv groups and FFN
// channels move to the front, consistently across the matrices that share them.
#include "peft/internal/s2ft_weights.h"
#include "peft/s2ft.h"

namespace tandem::peft {
namespace {

using model::Projection;

// Permutes one projection's weight rows (or columns) by `perm` in units of `unit`.
Status PermuteOne(ops::Context& ctx, model::LlamaModel& model, int64_t layer, Projection proj,
                  S2ftAxis axis, const std::vector<int64_t>& perm, int64_t unit, bool inverse) {
  TANDEM_ASSIGN_OR_RETURN(model::Parameter * p, internal::FindProjectionWeight(model, layer, proj));
  TANDEM_ASSIGN_OR_RETURN(const Tensor in, internal::ReadWeightF32(ctx, *p));
  Tensor out = Tensor::Cpu(in.shape(), DType::kF32);
  if (axis == S2ftAxis::kRows) {
    internal::PermuteRowsHost(out, in, perm, unit, inverse);
  } else {
    internal::PermuteColsHost(out, in, perm, unit, inverse);
  }
  return internal::WriteWeightF32(ctx, *p, out);
}

Status Permute(ops::Context& ctx, model::LlamaModel& model, const S2ftSelection& given,
               bool inverse) {
  const model::LlamaConfig& mc = model.config();
  S2ftSelection selection = given;
  TANDEM_RETURN_IF_ERROR(NormalizeS2ftSelection(selection, mc, "PermuteS2ftBase"));
  const internal::S2ftDims d = internal::DimsOf(mc);
  for (int64_t l = 0; l < d.L; ++l) {
    const S2ftLayerSelection& s = selection.layers[l];
    std::vector<int64_t> groups;
    for (size_t i = 0; i < s.heads.size(); i += d.g) groups.push_back(s.heads[i] / d.g);
    const std::vector<int64_t> group_order = internal::SelectedFirstOrder(groups, d.Hkv);
    const std::vector<int64_t> channel_order = internal::SelectedFirstOrder(s.channels, d.F);
    // Query heads move with their kv group: q rows and o columns in units of g heads.
    const int64_t qunit = d.g * d.D;
    TANDEM_RETURN_IF_ERROR(
        PermuteOne(ctx, model, l, Projection::kQ, S2ftAxis::kRows, group_order, qunit, inverse));
    TANDEM_RETURN_IF_ERROR(
        PermuteOne(ctx, model, l, Projection::kK, S2ftAxis::kRows, group_order, d.D, inverse));
    TANDEM_RETURN_IF_ERROR(
        PermuteOne(ctx, model, l, Projection::kV, S2ftAxis::kRows, group_order, d.D, inverse));
    TANDEM_RETURN_IF_ERROR(
        PermuteOne(ctx, model, l, Projection::kO, S2ftAxis::kColumns, group_order, qunit, inverse));
    TANDEM_RETURN_IF_ERROR(
        PermuteOne(ctx, model, l, Projection::kGate, S2ftAxis::kRows, channel_order, 1, inverse));
    TANDEM_RETURN_IF_ERROR(
        PermuteOne(ctx, model, l, Projection::kUp, S2ftAxis::kRows, channel_order, 1, inverse));
    TANDEM_RETURN_IF_ERROR(PermuteOne(ctx, model, l, Projection::kDown, S2ftAxis::kColumns,
                                      channel_order, 1, inverse));
  }
  return Status::Ok();
}

}  // namespace

Status PermuteS2ftBase(ops::Context& ctx, model::LlamaModel& model,
                       const S2ftSelection& selection) {
  return Permute(ctx, model, selection, /*inverse=*/false);
}

Status UnpermuteS2ftBase(ops::Context& ctx, model::LlamaModel& model,
                         const S2ftSelection& selection) {
  return Permute(ctx, model, selection, /*inverse=*/true);
}

}  // namespace tandem::peft
