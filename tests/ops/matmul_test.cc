// ops::Matmul on the CPU (OpenBLAS) against a naive f64 triple loop: every transpose combination,
// odd sizes, strided views, alpha/beta, NaN in c with beta == 0.
#include <omp.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "tests/ops/op_test_util.h"

namespace tandem::ops {
namespace {

using testing::AllClose;
using testing::RandomUniform;

// c[i, j] = alpha * sum_k op(a)[i, k] op(b)[k, j] + beta * c[i, j] (beta == 0 ignores c), in f64,
// over strided 2-D views.
void NaiveGemm(Tensor& c, const Tensor& a, const Tensor& b, bool ta, bool tb, float alpha,
               float beta) {
  const int64_t m = c.dim(0), n = c.dim(1), k = ta ? a.dim(0) : a.dim(1);
  const float* pa = a.data<float>();
  const float* pb = b.data<float>();
  float* pc = c.data<float>();
  // Element strides of op(a) [M, K] and op(b) [K, N].
  const int64_t a_i = ta ? a.stride(1) : a.stride(0), a_l = ta ? a.stride(0) : a.stride(1);
  const int64_t b_l = tb ? b.stride(1) : b.stride(0), b_j = tb ? b.stride(0) : b.stride(1);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0.0;
      for (int64_t l = 0; l < k; ++l) {
        acc += static_cast<double>(pa[i * a_i + l * a_l]) * pb[l * b_l + j * b_j];
      }
      float& out = pc[i * c.stride(0) + j * c.stride(1)];
      out =
          static_cast<float>(alpha * acc + (beta == 0.0f ? 0.0 : beta * static_cast<double>(out)));
    }
  }
}

// A [rows, cols] view with row stride cols + pad into a bigger random buffer.
Tensor PaddedView(int64_t rows, int64_t cols, int64_t pad, uint64_t seed) {
  return RandomUniform({rows, cols + pad}, seed).Slice(1, pad / 2, pad / 2 + cols);
}

// Tolerance for K-term f32 dot products of values in [-1, 1]: rounding grows with K.
testing::Tolerance GemmTolerance(int64_t k) { return {1e-6 * (k + 1), 1e-5}; }

class MatmulTest : public ::testing::TestWithParam<std::tuple<bool, bool>> {};

TEST_P(MatmulTest, MatchesNaiveOverOddSizesAndStridedViews) {
  const auto [ta, tb] = GetParam();
  auto ctx = Context::Cpu();
  // The last two span several of the CPU backend's 64 x 512 tiles of c.
  const int64_t sizes[][3] = {{1, 1, 1},    {3, 17, 5}, {17, 3, 1},     {17, 17, 17},
                              {33, 7, 127}, {1, 64, 3}, {130, 1030, 7}, {65, 513, 33}};
  uint64_t seed = 100;
  for (const auto& s : sizes) {
    const int64_t m = s[0], n = s[1], k = s[2];
    for (int64_t pad : {0, 3}) {
      SCOPED_TRACE(::testing::Message() << "M=" << m << " N=" << n << " K=" << k << " pad=" << pad);
      Tensor a = ta ? PaddedView(k, m, pad, ++seed) : PaddedView(m, k, pad, ++seed);
      Tensor b = tb ? PaddedView(n, k, pad, ++seed) : PaddedView(k, n, pad, ++seed);
      Tensor c_buf = RandomUniform({m, n + pad}, ++seed);
      Tensor c = c_buf.Slice(1, 0, n);
      Tensor expected = testing::Clone(c_buf);
      Tensor expected_c = expected.Slice(1, 0, n);
      for (auto [alpha, beta] : {std::pair{1.0f, 0.0f}, {0.5f, 1.5f}, {-2.0f, 1.0f}}) {
        NaiveGemm(expected_c, a, b, ta, tb, alpha, beta);
        ASSERT_TRUE(Matmul(*ctx, c, a, b, ta, tb, alpha, beta).ok());
        // Every element of the buffer: the view's values, and the padding left untouched.
        EXPECT_TRUE(AllClose(c_buf, expected, GemmTolerance(k)))
            << "alpha=" << alpha << " beta=" << beta;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllTransposes, MatmulTest,
                         ::testing::Combine(::testing::Bool(), ::testing::Bool()));

TEST(MatmulCpuTest, BetaZeroIgnoresNanInC) {
  auto ctx = Context::Cpu();
  Tensor a = RandomUniform({5, 7}, 1), b = RandomUniform({7, 3}, 2);
  Tensor c = Tensor::Cpu({5, 3}, DType::kF32);
  for (int64_t i = 0; i < c.numel(); ++i) {
    c.data<float>()[i] =
        i % 2 ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  }
  Tensor expected = Tensor::CpuZeros({5, 3}, DType::kF32);
  NaiveGemm(expected, a, b, false, false, 2.0f, 0.0f);
  ASSERT_TRUE(Matmul(*ctx, c, a, b, false, false, 2.0f, 0.0f).ok());
  EXPECT_TRUE(AllClose(c, expected, GemmTolerance(7)));
}

TEST(MatmulCpuTest, EmptyKScalesC) {
  auto ctx = Context::Cpu();
  Tensor a = Tensor::Cpu({4, 0}, DType::kF32), b = Tensor::Cpu({0, 3}, DType::kF32);
  Tensor c = RandomUniform({4, 3}, 3);
  Tensor expected = testing::Clone(c);
  for (int64_t i = 0; i < expected.numel(); ++i) expected.data<float>()[i] *= 0.5f;
  ASSERT_TRUE(Matmul(*ctx, c, a, b, false, false, 1.0f, 0.5f).ok());
  EXPECT_TRUE(AllClose(c, expected, {0, 0}));
  for (int64_t i = 0; i < c.numel(); ++i)
    c.data<float>()[i] = std::numeric_limits<float>::quiet_NaN();
  ASSERT_TRUE(Matmul(*ctx, c, a, b, false, false, 1.0f, 0.0f).ok());
  EXPECT_TRUE(AllClose(c, Tensor::CpuZeros({4, 3}, DType::kF32), {0, 0}));
}

TEST(MatmulCpuTest, DeterministicAcrossThreadCounts) {
  auto ctx = Context::Cpu();
  Tensor a = RandomUniform({257, 129}, 4), b = RandomUniform({129, 600}, 5);
  Tensor c1 = Tensor::Cpu({257, 600}, DType::kF32), c2 = Tensor::Cpu({257, 600}, DType::kF32);
  Tensor c3 = Tensor::Cpu({257, 600}, DType::kF32);
  omp_set_num_threads(1);
  ASSERT_TRUE(Matmul(*ctx, c1, a, b, false, false).ok());
  omp_set_num_threads(2);
  ASSERT_TRUE(Matmul(*ctx, c2, a, b, false, false).ok());
  ASSERT_TRUE(Matmul(*ctx, c3, a, b, false, false).ok());
  EXPECT_TRUE(testing::BitwiseEqual(c1, c2));
  EXPECT_TRUE(testing::BitwiseEqual(c2, c3));
  Tensor expected = Tensor::CpuZeros({257, 600}, DType::kF32);
  NaiveGemm(expected, a, b, false, false, 1.0f, 0.0f);
  EXPECT_TRUE(AllClose(c1, expected, GemmTolerance(129)));
}

}  // namespace
}  // namespace tandem::ops
