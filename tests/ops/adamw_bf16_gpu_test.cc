// ops::AdamWBf16Multi on a GPU against the CPU reference: the same noise and the same f32 math,
// so the same bits (a mismatch within one bf16 step is reported and tolerated in at most 0.1% of
// the elements, should the two f32 paths ever differ by an ulp next to a rounding boundary),
// over 60 tensors of odd sizes, misaligned views and both parameter dtypes, in one or two
// launches; and two steps in a row stay in step.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>

#include "ops/multi_tensor.h"
#include "tests/common/testing.h"
#include "tests/ops/adamw_bf16_case.h"

namespace tandem::ops {
namespace {

using testing::Bf16StateCase;
using testing::HostF32;

struct Mismatches {
  int64_t count = 0, total = 0;
};

void Compare(const Tensor& gpu, const Tensor& cpu, const char* what, size_t entry, Mismatches* mm) {
  const Tensor a = HostF32(gpu), b = HostF32(cpu);
  ASSERT_EQ(a.numel(), b.numel());
  for (int64_t k = 0; k < a.numel(); ++k) {
    const float x = a.data<float>()[k], y = b.data<float>()[k];
    ++mm->total;
    if (FloatBits(x) == FloatBits(y)) continue;
    ++mm->count;
    const float step = std::abs(y) * (1.0f / 128) + 1e-30f;
    ASSERT_LE(std::abs(x - y), step)
        << what << " of entry " << entry << " element " << k << ": gpu " << x << ", cpu " << y;
  }
}

TEST(AdamWBf16GpuTest, MatchesTheCpuReference) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto gpu = std::move(Context::Cuda(0)).value();
  auto cpu = Context::Cpu();
  Bf16StateCase on_gpu = testing::MakeBf16StateCase(*gpu, 60, 9);
  Bf16StateCase on_cpu = testing::MakeBf16StateCase(*cpu, 60, 9);
  for (int64_t step = 9; step <= 10; ++step) {
    for (Bf16StateCase* c : {&on_gpu, &on_cpu}) {
      for (size_t i = 0; i < c->key.size(); ++i) c->key[i] = AdamWNoiseKey(1234, step, i);
    }
    ASSERT_TRUE(testing::RunBf16State(*gpu, on_gpu, testing::Bf16StateParams(step)).ok());
    ASSERT_TRUE(testing::RunBf16State(*cpu, on_cpu, testing::Bf16StateParams(step)).ok());
    ASSERT_TRUE(gpu->Synchronize().ok());
  }
  Mismatches mm;
  for (size_t i = 0; i < on_gpu.param.size(); ++i) {
    Compare(on_gpu.param[i], on_cpu.param[i], "param", i, &mm);
    Compare(on_gpu.m[i], on_cpu.m[i], "m", i, &mm);
    Compare(on_gpu.v[i], on_cpu.v[i], "v", i, &mm);
  }
  std::printf("AdamWBf16Multi gpu vs cpu: %lld of %lld values differ\n",
              static_cast<long long>(mm.count), static_cast<long long>(mm.total));
  EXPECT_LE(mm.count, mm.total / 1000);
}

}  // namespace
}  // namespace tandem::ops
