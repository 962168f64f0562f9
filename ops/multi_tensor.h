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

// [bf16 state] One tensor's AdamW with 16-bit optimizer state (trainer: optimizer.precision =
// "bf16"): the update of AdamW (ops/ops.h) in the same f32 order, with no f32 master copy: `param`
// (f32 or bf16) is read and written in place, the moments m and v are bf16, grad is f32. Every
// bf16 result (m, v, and param when bf16) is rounded stochastically with the noise of noise_key
// (ops/internal/stochastic_round.h), so that updates below half a bf16 step (v's (1 - beta2) g^2,
// small learning rates) are kept in expectation instead of lost. 10 bytes of state per parameter
// with bf16 weights and f32 gradients, against AdamW's 18 with its f32 master and moments.
struct AdamWBf16Tensors {
  Tensor* param = nullptr;
  Tensor* m = nullptr;
  Tensor* v = nullptr;
  const Tensor* grad = nullptr;
  float weight_decay = 0.0f;
  uint64_t noise_key = 0;  // AdamWNoiseKey(seed, step, tensor)
};

// Every entry's update; params.weight_decay is ignored (each entry has its own). The CPU
// reference and the CUDA kernels give the same noise; their f32 math agrees as AdamW's does.
Status AdamWBf16Multi(Context& ctx, std::span<const AdamWBf16Tensors> entries,
                      const AdamWParams& params);

// The rounding noise key of tensor `tensor`'s update at `step` in a run seeded with `seed`:
// distinct for every (seed, step, tensor), so a resumed run draws the same noise.
uint64_t AdamWNoiseKey(uint64_t seed, int64_t step, uint64_t tensor);

// out[0] += the sum of x^2 over every tensor of xs (f32 [1]; xs any floating dtypes, contiguous).
Status SumSquaresMulti(Context& ctx, Tensor& out, std::span<const Tensor> xs);

}  // namespace tandem::ops
