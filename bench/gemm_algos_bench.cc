// Every cuBLASLt algorithm the heuristic offers for the skinny GEMMs of a decode step, timed: does
// a better one than the heuristic's first exist? y [M, N] = x [M, K] W^T with W [N, K], bf16 in
// and out, f32 compute, as ops::Matmul lays them out (cuBLASLt sees W as column-major A^T, x as
// B, so m_lt = N, n_lt = M).
//
//   tandem-gemm_algos_bench [--m 32] [--algos 32] [--iters 50]
//
// Prints one JSON line per (shape, algorithm): rank in the heuristic's order, tile, split-K,
// reduction scheme, workspace, time and the weight bytes over time. Shapes: TinyLlama-1.1B's
// qkv (2560 x 2048), o (2048 x 2048), gate|up (11264 x 2048), down (2048 x 5632) and the lm head
// (32000 x 2048). A tool for choosing, not a regression benchmark.
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#ifdef TANDEM_WITH_CUDA
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <nlohmann/json.hpp>

#include "core/version.h"

namespace {

void Die(const char* what, int code) {
  std::fprintf(stderr, "gemm_algos_bench: %s failed (%d)\n", what, code);
  std::exit(1);
}
#define CK(x)                                \
  do {                                       \
    cudaError_t e_ = (x);                    \
    if (e_ != cudaSuccess) Die(#x, int(e_)); \
  } while (0)
#define LT(x)                                          \
  do {                                                 \
    cublasStatus_t s_ = (x);                           \
    if (s_ != CUBLAS_STATUS_SUCCESS) Die(#x, int(s_)); \
  } while (0)

template <typename V>
V Attr(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t a) {
  V v{};
  size_t written = 0;
  cublasLtMatmulAlgoConfigGetAttribute(&algo, a, &v, sizeof(v), &written);
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> kv;
  for (int i = 1; i + 1 < argc; i += 2) kv[std::string(argv[i]).substr(2)] = argv[i + 1];
  auto flag = [&](const char* k, long d) { return kv.count(k) ? std::stol(kv[k]) : d; };
  const long M = flag("m", 32), want = flag("algos", 32), iters = flag("iters", 50);
  const std::vector<std::pair<const char*, std::pair<long, long>>> shapes = {
      {"qkv", {2560, 2048}},
      {"o", {2048, 2048}},
      {"gate_up", {11264, 2048}},
      {"down", {2048, 5632}},
      {"lm_head", {32000, 2048}}};
  cublasLtHandle_t lt;
  LT(cublasLtCreate(&lt));
  const size_t ws_bytes = size_t{32} << 20;
  void* ws;
  CK(cudaMalloc(&ws, ws_bytes));
  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (const auto& [name, nk] : shapes) {
    const long N = nk.first, K = nk.second;
    void *w, *x, *y;
    CK(cudaMalloc(&w, N * K * 2));
    CK(cudaMalloc(&x, M * K * 2));
    CK(cudaMalloc(&y, M * N * 2));
    CK(cudaMemset(w, 0, N * K * 2));
    CK(cudaMemset(x, 0, M * K * 2));
    cublasLtMatmulDesc_t desc;
    LT(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t t = CUBLAS_OP_T, n = CUBLAS_OP_N;
    LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof(t)));
    LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &n, sizeof(n)));
    cublasLtMatrixLayout_t la, lb, lc;
    LT(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, K, N, K));  // W row-major [N, K]
    LT(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, K, M, K));  // x row-major [M, K]
    LT(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, N, M, N));  // y row-major [M, N]
    cublasLtMatmulPreference_t pref;
    LT(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t wsl = ws_bytes;
    LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsl,
                                            sizeof(wsl)));
    std::vector<cublasLtMatmulHeuristicResult_t> res(want);
    int found = 0;
    LT(cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, lc, lc, pref, static_cast<int>(want),
                                      res.data(), &found));
    const float alpha = 1.0f, beta = 0.0f;
    for (int i = 0; i < found; ++i) {
      if (res[i].state != CUBLAS_STATUS_SUCCESS) continue;
      auto run = [&] {
        return cublasLtMatmul(lt, desc, &alpha, w, la, x, lb, &beta, y, lc, y, lc, &res[i].algo, ws,
                              res[i].workspaceSize, stream);
      };
      if (run() != CUBLAS_STATUS_SUCCESS) continue;
      for (int r = 0; r < 5; ++r) run();
      CK(cudaEventRecord(e0, stream));
      for (long r = 0; r < iters; ++r) run();
      CK(cudaEventRecord(e1, stream));
      CK(cudaEventSynchronize(e1));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      const double us = 1e3 * ms / iters;
      nlohmann::json j = {
          {"bench", "gemm_algos"},
          {"commit", tandem::GitCommit()},
          {"shape", name},
          {"m", M},
          {"n", N},
          {"k", K},
          {"rank", i},
          {"algo_id", Attr<int32_t>(res[i].algo, CUBLASLT_ALGO_CONFIG_ID)},
          {"tile", Attr<uint32_t>(res[i].algo, CUBLASLT_ALGO_CONFIG_TILE_ID)},
          {"stages", Attr<uint32_t>(res[i].algo, CUBLASLT_ALGO_CONFIG_STAGES_ID)},
          {"split_k", Attr<int32_t>(res[i].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM)},
          {"reduction", Attr<uint32_t>(res[i].algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME)},
          {"workspace", res[i].workspaceSize},
          {"us", us},
          {"weight_tb_per_s", 2.0 * N * K / (us * 1e-6) / 1e12}};
      std::printf("%s\n", j.dump().c_str());
    }
    std::fflush(stdout);
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(lc);
    cublasLtMatmulDescDestroy(desc);
    CK(cudaFree(w));
    CK(cudaFree(x));
    CK(cudaFree(y));
  }
  return 0;
}

#else

int main() {
  std::fprintf(stderr, "tandem-gemm_algos_bench: this build has no CUDA support\n");
  return 1;
}

#endif
