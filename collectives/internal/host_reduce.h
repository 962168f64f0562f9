// Host reduction kernels shared by the thread group (rank-order reductions) and MPI (bf16/f16
// widening to f32). Plain loops, no framework types, so they are easy to check.
#pragma once

#include <cstdint>
#include <vector>

#include "collectives/communicator.h"
#include "core/dtype.h"

namespace tandem::collectives::internal {

// out[i] = ins[0][i] (op) ins[1][i] (op) ... in this order, for i in [0, n). f32, bf16 and f16
// accumulate in f32 and round once; integers wrap around; kAvg divides the f32 sum by the number
// of inputs. `out` may alias one of `ins` only when n elements are read before any is written,
// which holds element by element, so aliasing is allowed.
void ReduceInOrder(void* out, const std::vector<const void*>& ins, int64_t n, DType dtype,
                   ReduceOp op);

// bf16/f16 <-> f32 conversions (round to nearest even), n elements.
void WidenToF32(float* dst, const void* src, DType dtype, int64_t n);
void NarrowFromF32(void* dst, const float* src, DType dtype, int64_t n);
// x[i] /= divisor (kAvg: the sum divided by the rank count, as the reference does it).
void DivideF32(float* x, int64_t n, float divisor);

}  // namespace tandem::collectives::internal
