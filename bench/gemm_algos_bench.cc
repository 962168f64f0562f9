// Every cuBLASLt algorithm the heuristic offers for a GEMM, timed: does a better one than the
// heuristic's first exist? Two sets of shapes:
//   decode (default): y [M, N] = x [M, K] W^T for the skinny GEMMs of a decode step, bf16 in and
//     out, TinyLlama-1.1B's qkv (2560 x 2048), o (2048 x 2048), gate|up (11264 x 2048), down
//     (2048 x 5632) and the lm head (32000 x 2048).
//   --train 1: the GEMMs of one 1.1B training step (examples/llama-1b-full.toml: hidden 2048, ffn
//     8192, 32/8 heads of 64) at M = batch x seq tokens: for qkv (3072 x 2048), o, gate|up
//     (16384 x 2048), down (2048 x 8192) and the lm head (32000 x 2048) the forward y = x W^T,
//     the input gradient dx = dy W (bf16 out) and the weight gradient dW = dy^T x (f32 out, as
//     with f32 master weights; --grad-bf16 1 for bf16 state).
//   --lora 1: the skinny GEMMs of the 1.1B LoRA step (rank 16 on all seven projections, the wide
//     path) at M = 8192 tokens: the shrinks s h [M, R] = x [M, in] A^T of the four projection
//     groups (R = 48, 16, 32, 16) and the dh = dy_m B_m [M, 16] of each projection; their
//     "weight" bytes are the streamed activation's (x or dy), which is what bounds them.
// Operands are row-major as ops::Matmul lays them out (cuBLASLt sees them transposed, see
// ops/cuda/gemm.cu), filled with random values (all-zero inputs draw less power and run faster).
//
//   tandem-gemm_algos_bench [--train 0 | --lora 0] [--m 32 | 8192] [--algos 32] [--iters 50]
//
// Prints one JSON line per (shape, pass, algorithm): rank in the heuristic's order, tile,
// split-K, reduction scheme, workspace, time, TFLOP/s and the weight bytes over time. A tool for
// choosing, not a regression benchmark.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <tuple>
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

// One GEMM in ops::Matmul's row-major terms: c [m, n] = op(a) [m, k] @ op(b) [k, n].
struct Case {
  std::string shape, pass;
  long m, n, k;
  bool trans_a, trans_b, c_f32;
  long weight_elems;  // the weight's elements (for the decode rows' bytes over time)
};

uint16_t Bf16Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> kv;
  for (int i = 1; i + 1 < argc; i += 2) kv[std::string(argv[i]).substr(2)] = argv[i + 1];
  auto flag = [&](const char* k, long d) { return kv.count(k) ? std::stol(kv[k]) : d; };
  const bool train = flag("train", 0) != 0, grad_bf16 = flag("grad-bf16", 0) != 0;
  const bool lora = flag("lora", 0) != 0;
  const long M = flag("m", train || lora ? 8192 : 32), want = flag("algos", 32),
             iters = flag("iters", train || lora ? 20 : 50);
  std::vector<Case> cases;
  if (lora) {
    // {group, R, in}: s h = x A^T; {projection, out}: dh = dy B (rank 16).
    const std::vector<std::tuple<const char*, long, long>> shrinks = {
        {"qkv", 48, 2048}, {"o", 16, 2048}, {"gate_up", 32, 2048}, {"down", 16, 8192}};
    for (const auto& [name, r, in] : shrinks) {
      cases.push_back({name, "lora_shrink", M, r, in, false, true, false, M * in});
    }
    const std::vector<std::pair<const char*, long>> dhs = {
        {"q", 2048}, {"k", 512}, {"o", 2048}, {"gate", 8192}, {"down", 2048}};
    for (const auto& [name, out] : dhs) {
      cases.push_back({name, "lora_dh", M, 16, out, false, false, false, M * out});
    }
  } else if (train) {
    const std::vector<std::pair<const char*, std::pair<long, long>>> shapes = {
        {"qkv", {3072, 2048}},
        {"o", {2048, 2048}},
        {"gate_up", {16384, 2048}},
        {"down", {2048, 8192}},
        {"lm_head", {32000, 2048}}};
    for (const auto& [name, nk] : shapes) {
      const long N = nk.first, K = nk.second;
      cases.push_back({name, "fwd", M, N, K, false, true, false, N * K});
      cases.push_back({name, "dgrad", M, K, N, false, false, false, N * K});
      if (std::string(name) != "lm_head") {
        cases.push_back({name, "wgrad", N, K, M, true, false, !grad_bf16, N * K});
      }
    }
  } else {
    const std::vector<std::pair<const char*, std::pair<long, long>>> shapes = {
        {"qkv", {2560, 2048}},
        {"o", {2048, 2048}},
        {"gate_up", {11264, 2048}},
        {"down", {2048, 5632}},
        {"lm_head", {32000, 2048}}};
    for (const auto& [name, nk] : shapes) {
      cases.push_back(
          {name, "fwd", M, nk.first, nk.second, false, true, false, nk.first * nk.second});
    }
  }
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
  // Random bf16 in [-1, 1) for both inputs, enough for the largest operand.
  long max_elems = 0;
  for (const Case& c : cases) max_elems = std::max({max_elems, c.m * c.k, c.k * c.n});
  std::vector<uint16_t> host(max_elems);
  uint64_t state = 0x9e3779b97f4a7c15ull;
  for (uint16_t& v : host) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    v = Bf16Bits(static_cast<float>(state >> 40) / float(1 << 23) - 1.0f);
  }
  double sum_first_us = 0, sum_best_us = 0;
  for (const Case& cs : cases) {
    const long m = cs.m, n = cs.n, k = cs.k;
    void *a, *b, *c;
    CK(cudaMalloc(&a, m * k * 2));
    CK(cudaMalloc(&b, k * n * 2));
    CK(cudaMalloc(&c, m * n * (cs.c_f32 ? 4 : 2)));
    CK(cudaMemcpy(a, host.data(), m * k * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(b, host.data(), k * n * 2, cudaMemcpyHostToDevice));
    const long lda = cs.trans_a ? m : k, ldb = cs.trans_b ? k : n, ldc = n;
    cublasLtMatmulDesc_t desc;
    LT(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    // cuBLASLt's A is our b, its B our a (column-major views of row-major operands).
    const cublasOperation_t op_a = cs.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_b = cs.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
    LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
    cublasLtMatrixLayout_t la, lb, lc;
    LT(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, cs.trans_b ? k : n, cs.trans_b ? n : k, ldb));
    LT(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, cs.trans_a ? m : k, cs.trans_a ? k : m, lda));
    LT(cublasLtMatrixLayoutCreate(&lc, cs.c_f32 ? CUDA_R_32F : CUDA_R_16BF, n, m, ldc));
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
    double first_us = -1, best_us = -1;
    int best_rank = -1;
    for (int i = 0; i < found; ++i) {
      if (res[i].state != CUBLAS_STATUS_SUCCESS) continue;
      auto run = [&] {
        return cublasLtMatmul(lt, desc, &alpha, b, la, a, lb, &beta, c, lc, c, lc, &res[i].algo, ws,
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
      if (i == 0) first_us = us;
      if (best_us < 0 || us < best_us) best_us = us, best_rank = i;
      nlohmann::json j = {
          {"bench", "gemm_algos"},
          {"commit", tandem::GitCommit()},
          {"shape", cs.shape},
          {"pass", cs.pass},
          {"m", m},
          {"n", n},
          {"k", k},
          {"rank", i},
          {"algo_id", Attr<int32_t>(res[i].algo, CUBLASLT_ALGO_CONFIG_ID)},
          {"tile", Attr<uint32_t>(res[i].algo, CUBLASLT_ALGO_CONFIG_TILE_ID)},
          {"stages", Attr<uint32_t>(res[i].algo, CUBLASLT_ALGO_CONFIG_STAGES_ID)},
          {"split_k", Attr<int32_t>(res[i].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM)},
          {"reduction", Attr<uint32_t>(res[i].algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME)},
          {"cluster", Attr<uint32_t>(res[i].algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID)},
          {"workspace", res[i].workspaceSize},
          {"us", us},
          {"tflops", 2.0 * m * n * k / (us * 1e-6) / 1e12},
          {"weight_tb_per_s", 2.0 * cs.weight_elems / (us * 1e-6) / 1e12}};
      std::printf("%s\n", j.dump().c_str());
    }
    if (first_us > 0) {
      sum_first_us += first_us;
      sum_best_us += best_us;
      nlohmann::json j = {{"bench", "gemm_algos_summary"},
                          {"shape", cs.shape},
                          {"pass", cs.pass},
                          {"offered", found},
                          {"first_us", first_us},
                          {"best_us", best_us},
                          {"best_rank", best_rank},
                          {"gain", first_us / best_us - 1.0}};
      std::printf("%s\n", j.dump().c_str());
    }
    std::fflush(stdout);
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(lc);
    cublasLtMatmulDescDestroy(desc);
    CK(cudaFree(a));
    CK(cudaFree(b));
    CK(cudaFree(c));
  }
  nlohmann::json j = {
      {"bench", "gemm_algos_total"}, {"first_us", sum_first_us}, {"best_us", sum_best_us}};
  std::printf("%s\n", j.dump().c_str());
  return 0;
}

#else

int main() {
  std::fprintf(stderr, "tandem-gemm_algos_bench: this build has no CUDA support\n");
  return 1;
}

#endif
