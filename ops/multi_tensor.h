// Multi-tensor forms of the optimizer ops: one optimizer step's AdamW updates and gradient norm
// over many parameter tensors in a few kernel launches instead of one or two per tensor (a LoRA
// adapter of the 1.1B model has 224 tensors, each a few tens of thousands of elements, so the
// per-tensor launches, not the bytes, set the optimizer's time).
//
//   std::vector<ops::AdamWTensors> list = ...;        // one entry per trainable parameter
//   TANDEM_RETURN_IF_ERROR(ops::SumSquaresMulti(ctx, norm_acc, grads));
//   TANDEM_RETURN_IF_ERROR(ops::AdamWMulti(ctx, list, params));
//
// Results are bitwise those of the single-tensor ops (ops/ops.h) called once per tensor in list
// order: AdamW is elementwise, and SumSquaresMulti reduces each tensor with SumSquares' own grid
// and adds the tensors' totals to out in list order. Same validation and errors as the single
// ops, naming the entry.
#pragma once

#include <span>

#include "core/status.h"
#include "core/tensor.h"
#include "ops/context.h"
#include "ops/ops.h"

namespace tandem::ops {

// One tensor's AdamW update: AdamW(ctx, *master, *m, *v, model_weights (or an undefined tensor
// when null), *grad, params with this weight_decay).
struct AdamWTensors {
  Tensor* master = nullptr;
  Tensor* m = nullptr;
  Tensor* v = nullptr;
  Tensor* model_weights = nullptr;  // optional
  const Tensor* grad = nullptr;
  float weight_decay = 0.0f;
};

// Every entry's update; params.weight_decay is ignored (each entry has its own).
Status AdamWMulti(Context& ctx, std::span<const AdamWTensors> entries, const AdamWParams& params);

// out[0] += the sum of x^2 over every tensor of xs (f32 [1]; xs any floating dtypes, contiguous).
Status SumSquaresMulti(Context& ctx, Tensor& out, std::span<const Tensor> xs);

}  // namespace tandem::ops
