// Host f32 access to a LlamaModel's projection weights, for S²FT's selection, permutation and
// merge (not hot paths: whole matrices go through the host). Private to peft.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"
#include "core/tensor.h"
#include "model/adapter.h"
#include "model/llama.h"
#include "ops/context.h"

namespace tandem::peft::internal {

// The sizes S²FT works with (defaults resolved: Hkv = Hq, D = C / Hq when 0).
struct S2ftDims {
  int64_t C = 0, F = 0, L = 0, Hq = 0, Hkv = 0, D = 0;
  int64_t g = 1;  // query heads per kv head
};
S2ftDims DimsOf(const model::LlamaConfig& base);

// The parameter of projection `proj` of block `layer` ("model.layers.L.<module>.<proj>.weight");
// NotFound naming it otherwise.
StatusOr<model::Parameter*> FindProjectionWeight(model::LlamaModel& model, int64_t layer,
                                                 model::Projection proj);

// A host f32 copy of the parameter: its f32 master when it has its own, else its weight.
StatusOr<Tensor> ReadWeightF32(ops::Context& ctx, const model::Parameter& p);
// Writes a host f32 tensor of the parameter's shape into its master (when separate) and weight
// (rounded to the weight's dtype).
Status WriteWeightF32(ops::Context& ctx, model::Parameter& p, const Tensor& host_f32);

// out[j] = in[perm[j]] along rows (or columns) in units of `unit` consecutive rows (columns);
// with `inverse`, out[perm[j]] = in[j]. in, out host f32 [R, C], contiguous, same shape.
void PermuteRowsHost(Tensor& out, const Tensor& in, const std::vector<int64_t>& perm, int64_t unit,
                     bool inverse);
void PermuteColsHost(Tensor& out, const Tensor& in, const std::vector<int64_t>& perm, int64_t unit,
                     bool inverse);

// `selected` (ascending, within [0, n)) first, then the others ascending.
std::vector<int64_t> SelectedFirstOrder(const std::vector<int64_t>& selected, int64_t n);

}  // namespace tandem::peft::internal
