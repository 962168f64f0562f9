#include "tests/common/testing.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <sstream>

namespace tandem::testing {

namespace {
double LoadF64(const Tensor& t, int64_t i) {
  switch (t.dtype()) {
    case DType::kF32: return t.data<float>()[i];
    case DType::kBF16: return Bf16ToFloat(t.data<Bf16>()[i]);
    case DType::kF16: return F16ToFloat(t.data<F16>()[i]);
    case DType::kI32: return t.data<int32_t>()[i];
    case DType::kI64: return static_cast<double>(t.data<int64_t>()[i]);
    case DType::kU8: return t.data<uint8_t>()[i];
  }
  return 0;
}
}  // namespace

Tensor RandomUniform(const Shape& shape, uint64_t seed, float lo, float hi) {
  Tensor t = Tensor::Cpu(shape, DType::kF32);
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = dist(gen);
  return t;
}

Tensor RandomInts(const Shape& shape, uint64_t seed, int32_t bound) {
  Tensor t = Tensor::Cpu(shape, DType::kI32);
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int32_t> dist(0, bound - 1);
  int32_t* p = t.data<int32_t>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = dist(gen);
  return t;
}

::testing::AssertionResult AllClose(const Tensor& actual, const Tensor& expected, Tolerance tol) {
  if (actual.shape() != expected.shape()) {
    return ::testing::AssertionFailure() << "shape " << ShapeToString(actual.shape()) << " vs expected "
                                         << ShapeToString(expected.shape());
  }
  if (!actual.device().is_cpu() || !expected.device().is_cpu() || !actual.is_contiguous() ||
      !expected.is_contiguous()) {
    return ::testing::AssertionFailure() << "AllClose needs contiguous host tensors";
  }
  int64_t bad = 0, worst = -1;
  double worst_excess = 0;
  for (int64_t i = 0; i < actual.numel(); ++i) {
    const double a = LoadF64(actual, i), e = LoadF64(expected, i);
    const double limit = tol.abs + tol.rel * std::fabs(e);
    const double err = std::fabs(a - e);
    if (!(err <= limit)) {  // NaN fails
      ++bad;
      const double excess = std::isnan(err) ? INFINITY : err - limit;
      if (worst < 0 || excess > worst_excess) {
        worst = i;
        worst_excess = excess;
      }
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << actual.numel()
                                       << " elements differ; worst at flat index " << worst << ": actual "
                                       << LoadF64(actual, worst) << ", expected " << LoadF64(expected, worst)
                                       << " (abs " << tol.abs << ", rel " << tol.rel << ")";
}

double MaxRelativeError(const Tensor& actual, const Tensor& expected) {
  TANDEM_CHECK(actual.shape() == expected.shape());
  double max_err = 0, max_ref = 0;
  for (int64_t i = 0; i < actual.numel(); ++i) {
    const double a = LoadF64(actual, i), e = LoadF64(expected, i);
    max_err = std::max(max_err, std::fabs(a - e));
    max_ref = std::max(max_ref, std::fabs(e));
    if (std::isnan(a)) return INFINITY;
  }
  return max_ref == 0 ? max_err : max_err / max_ref;
}

TempDir::TempDir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "tandem-test-XXXXXX").string();
  char* p = mkdtemp(tmpl.data());
  TANDEM_CHECK_MSG(p != nullptr, "mkdtemp failed");
  path_ = p;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string SourceDir() {
  const char* env = std::getenv("TANDEM_SOURCE_DIR");
  if (env && *env) return env;
#ifdef TANDEM_SOURCE_DIR
  return TANDEM_SOURCE_DIR;
#else
  return ".";
#endif
}

}  // namespace tandem::testing
