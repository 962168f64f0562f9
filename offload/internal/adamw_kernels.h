// The per-ISA AdamW loops behind offload::CpuAdamWRange. Each processes n elements and hands its
// tail to the scalar loop; all compute the same bits.
#pragma once

#include <cstdint>

#include "core/dtype.h"
#include "offload/cpu_adamw.h"

namespace tandem::offload::internal {

void AdamWScalar(const AdamWScalars& s, float* master, float* m, float* v, Bf16* w,
                 const float* grad, int64_t n);
void AdamWAvx2(const AdamWScalars& s, float* master, float* m, float* v, Bf16* w, const float* grad,
               int64_t n);
void AdamWAvx512(const AdamWScalars& s, float* master, float* m, float* v, Bf16* w,
                 const float* grad, int64_t n);

}  // namespace tandem::offload::internal
