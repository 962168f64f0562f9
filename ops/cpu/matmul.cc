// CPU GEMM: OpenBLAS sgemm (row-major) over fixed tiles of c, tiles spread over OpenMP threads.
//
// OpenBLAS's own threading splits work by its thread count and does not give bitwise-identical
// results for 1 and 2 threads. So the CPU backend runs OpenBLAS single-threaded (a process-wide
// setting of that library, made once on first use) and parallelizes here over tiles whose bounds
// depend only on M and N: each tile is one deterministic sgemm, whatever thread runs it.
#include <cblas.h>

#include <algorithm>
#include <cstring>

#include "ops/cpu/kernels.h"

namespace tandem::ops::cpu {
namespace {

constexpr int64_t kTileRows = 64;
constexpr int64_t kTileCols = 512;

void UseSingleThreadedBlas() {
  static const bool done = [] {
    openblas_set_num_threads(1);
    return true;
  }();
  (void)done;
}

}  // namespace

void Gemm(float* c, int64_t ldc, const float* a, int64_t lda, const float* b, int64_t ldb,
          int64_t m, int64_t n, int64_t k, bool trans_a, bool trans_b, float alpha, float beta) {
  if (m == 0 || n == 0) return;
  if (beta == 0.0f) {
    // BLAS may compute beta * c; zero c first so NaN or Inf in its old contents cannot leak.
    for (int64_t i = 0; i < m; ++i) std::memset(c + i * ldc, 0, sizeof(float) * n);
  }
  if (k == 0) {
    if (beta != 0.0f && beta != 1.0f) {
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) c[i * ldc + j] *= beta;
      }
    }
    return;
  }
  UseSingleThreadedBlas();
  // Leading dimensions as stored: a is [M, K] (or [K, M] when trans_a), b is [K, N] (or [N, K]).
  lda = std::max(lda, trans_a ? m : k);
  ldb = std::max(ldb, trans_b ? k : n);
  ldc = std::max(ldc, n);
  const int64_t row_tiles = (m + kTileRows - 1) / kTileRows;
  const int64_t col_tiles = (n + kTileCols - 1) / kTileCols;
#pragma omp parallel for schedule(dynamic, \
                                  1) if (row_tiles * col_tiles > 1 && m * n * k > (1 << 18))
  for (int64_t tile = 0; tile < row_tiles * col_tiles; ++tile) {
    const int64_t i0 = (tile / col_tiles) * kTileRows, j0 = (tile % col_tiles) * kTileCols;
    const int64_t rows = std::min(kTileRows, m - i0), cols = std::min(kTileCols, n - j0);
    // The tile's rows of op(a) and columns of op(b).
    const float* a_tile = trans_a ? a + i0 : a + i0 * lda;
    const float* b_tile = trans_b ? b + j0 * ldb : b + j0;
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, static_cast<blasint>(rows),
                static_cast<blasint>(cols), static_cast<blasint>(k), alpha, a_tile,
                static_cast<blasint>(lda), b_tile, static_cast<blasint>(ldb), beta,
                c + i0 * ldc + j0, static_cast<blasint>(ldc));
  }
}

}  // namespace tandem::ops::cpu
