// Device-side token selection for the serving engine (serve/engine.h): the greedy choice of each
// row of logits without copying the logits to the host. CPU reference and CUDA kernel; the host
// sampler (serve/sampling.h) stays the reference for temperature / top-k / top-p draws.
//
//   Tensor ids = Tensor::Empty({R}, DType::kI32, ctx.allocator()).value();
//   TANDEM_RETURN_IF_ERROR(ops::ArgmaxRows(ctx, ids, logits, /*valid=*/tokenizer_vocab));
//   // copy `ids` (R * 4 bytes) to the host instead of logits (R * V * 2 bytes)
//
// Thread-safety: as every op (ops/ops.h).
#pragma once

#include <cstdint>

#include "core/tensor.h"
#include "ops/context.h"

namespace tandem::ops {

// ids i32 [R] = per row of logits [R, V] (f32 on CPU, f32 or bf16 on CUDA, row stride free), the
// index of the largest value among columns [0, valid), the lowest such index on ties (as
// serve::Argmax). A row that holds a NaN or +inf among those columns, or only -inf, gets
// kArgmaxInvalidRow: the caller reports a broken model instead of choosing a token.
// 1 <= valid <= V.
inline constexpr int32_t kArgmaxInvalidRow = -1;
Status ArgmaxRows(Context& ctx, Tensor& ids, const Tensor& logits, int64_t valid);

}  // namespace tandem::ops
