// GEMM through cuBLASLt (ops::Matmul): c = alpha * op(a) @ op(b) + beta * c.
//
// tandem's operands are row-major with row strides; cuBLASLt is column-major. A row-major [R, C]
// matrix with row stride ld is, read column-major, its transpose [C, R] with leading dimension
// ld. So the row-major c [M, N] is the column-major c^T [N, M], and we ask cuBLASLt for
//   c^T = op(b)^T @ op(a)^T
// i.e. cuBLASLt's A is our b, its B is our a, m_lt = N, n_lt = M, k_lt = K, and each operand
// keeps its own transpose flag (see BuildPlan).
//
// GemmState owns the handle, a 32 MiB workspace and a small cache of descriptors, layouts and the
// algorithm the heuristic chose, keyed by everything that affects the choice (dtypes, sizes,
// transposes, leading dimensions, pointer alignments), so steady-state calls make no heuristic
// query. cuBLASLt has no f32 x f32 -> bf16 kernel; that case runs through an f32 buffer (the
// workspace) in row chunks and a rounding epilogue. One GemmState per Context: not thread-safe.
#include <cublasLt.h>

#include <algorithm>
#include <string>
#include <vector>

#include "ops/cuda/common.cuh"
#include "ops/internal/cuda_kernels.h"

namespace tandem::ops::cuda {
namespace {

constexpr size_t kWorkspaceBytes = size_t{32} << 20;
constexpr size_t kMaxPlans = 128;  // a Llama step uses a few dozen shapes

struct GemmKey {
  DType ab_dtype, c_dtype;
  int64_t m, n, k, lda, ldb, ldc;
  bool trans_a, trans_b;
  uint32_t align_a, align_b, align_c;  // bytes, power of two, at most 256
  uint64_t workspace_limit;
  bool operator==(const GemmKey&) const = default;
};

struct GemmPlan {
  GemmKey key;
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t lt_a = nullptr;  // describes our b
  cublasLtMatrixLayout_t lt_b = nullptr;  // describes our a
  cublasLtMatrixLayout_t lt_c = nullptr;  // c and d (the same buffer)
  cublasLtMatmulAlgo_t algo{};
  size_t workspace_bytes = 0;
};

void DestroyPlan(GemmPlan& p) {
  if (p.lt_c != nullptr) cublasLtMatrixLayoutDestroy(p.lt_c);
  if (p.lt_b != nullptr) cublasLtMatrixLayoutDestroy(p.lt_b);
  if (p.lt_a != nullptr) cublasLtMatrixLayoutDestroy(p.lt_a);
  if (p.desc != nullptr) cublasLtMatmulDescDestroy(p.desc);
  p = GemmPlan{};
}

std::string LtError(const char* call, cublasStatus_t status) {
  return std::string(call) + ": " + cublasLtGetStatusName(status) + " (" +
         cublasLtGetStatusString(status) + ")";
}

std::string ShapeText(const GemmKey& k) {
  return "m=" + std::to_string(k.m) + " n=" + std::to_string(k.n) + " k=" + std::to_string(k.k) +
         " lda=" + std::to_string(k.lda) + " ldb=" + std::to_string(k.ldb) +
         " ldc=" + std::to_string(k.ldc) + " trans_a=" + std::to_string(k.trans_a) +
         " trans_b=" + std::to_string(k.trans_b) + " ab=" + DTypeName(k.ab_dtype) +
         " c=" + DTypeName(k.c_dtype);
}

uint32_t PointerAlignment(const void* p) {
  const uintptr_t v = reinterpret_cast<uintptr_t>(p);
  if (v == 0) return 256;
  return static_cast<uint32_t>(std::min<uintptr_t>(v & (~v + 1), 256));
}

cudaDataType_t LtType(DType d) { return d == DType::kF32 ? CUDA_R_32F : CUDA_R_16BF; }

// c = tmp (nullable: 0) + beta * c, row-major [rows, cols]; beta == 0 never reads c.
template <typename TC>
__global__ void GemmEpilogueKernel(TC* c, int64_t ldc, const float* tmp, int64_t ldt,
                                   int64_t rows, int64_t cols, float beta) {
  const int64_t total = rows * cols;
  for (int64_t i = GlobalThreadIndex(); i < total; i += GlobalThreadCount()) {
    const int64_t r = i / cols;
    const int64_t j = i - r * cols;
    float v = tmp != nullptr ? tmp[r * ldt + j] : 0.0f;
    if (beta != 0.0f) v += beta * ToFloat(c[r * ldc + j]);
    c[r * ldc + j] = FromFloat<TC>(v);
  }
}

std::string LaunchEpilogue(cudaStream_t stream, DType c_dtype, void* c, int64_t ldc,
                           const float* tmp, int64_t ldt, int64_t rows, int64_t cols, float beta) {
  const int threads = 256;
  const unsigned blocks = GridFor(rows * cols, threads);
  if (c_dtype == DType::kF32) {
    GemmEpilogueKernel<float><<<blocks, threads, 0, stream>>>(static_cast<float*>(c), ldc, tmp,
                                                              ldt, rows, cols, beta);
  } else {
    GemmEpilogueKernel<bf16><<<blocks, threads, 0, stream>>>(static_cast<bf16*>(c), ldc, tmp, ldt,
                                                             rows, cols, beta);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return std::string("Gemm epilogue kernel: ") + cudaGetErrorString(err);
  return "";
}

}  // namespace

struct GemmState {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;  // kWorkspaceBytes on `device`
  int device = 0;
  std::vector<GemmPlan> plans;  // at most kMaxPlans; replaced round-robin when full
  size_t next_evict = 0;
};

namespace {

// Creates the descriptors for `key` and asks the heuristic for the best algorithm.
std::string BuildPlan(GemmState& state, const GemmKey& key, GemmPlan* plan) {
  *plan = GemmPlan{};
  plan->key = key;
  cublasStatus_t st = cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
  if (st != CUBLAS_STATUS_SUCCESS) return LtError("cublasLtMatmulDescCreate", st);
  // cuBLASLt's A is our b and its B is our a (see the file comment).
  const cublasOperation_t op_lt_a = key.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_lt_b = key.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  st = cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_lt_a,
                                      sizeof(op_lt_a));
  if (st != CUBLAS_STATUS_SUCCESS) return LtError("cublasLtMatmulDescSetAttribute(TRANSA)", st);
  st = cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_lt_b,
                                      sizeof(op_lt_b));
  if (st != CUBLAS_STATUS_SUCCESS) return LtError("cublasLtMatmulDescSetAttribute(TRANSB)", st);

  // Stored (pre-op) column-major shapes. b is row-major [K, N] (or [N, K] when trans_b), i.e.
  // column-major [N, K] (or [K, N]); likewise a is column-major [K, M] (or [M, K]).
  const uint64_t a_rows = key.trans_b ? key.k : key.n, a_cols = key.trans_b ? key.n : key.k;
  const uint64_t b_rows = key.trans_a ? key.m : key.k, b_cols = key.trans_a ? key.k : key.m;
  const cudaDataType_t ab = LtType(key.ab_dtype), c = LtType(key.c_dtype);
  st = cublasLtMatrixLayoutCreate(&plan->lt_a, ab, a_rows, a_cols, key.ldb);
  if (st != CUBLAS_STATUS_SUCCESS) return LtError("cublasLtMatrixLayoutCreate(b)", st);
  st = cublasLtMatrixLayoutCreate(&plan->lt_b, ab, b_rows, b_cols, key.lda);
  if (st != CUBLAS_STATUS_SUCCESS) return LtError("cublasLtMatrixLayoutCreate(a)", st);
  st = cublasLtMatrixLayoutCreate(&plan->lt_c, c, key.n, key.m, key.ldc);
  if (st != CUBLAS_STATUS_SUCCESS) return LtError("cublasLtMatrixLayoutCreate(c)", st);

  cublasLtMatmulPreference_t pref = nullptr;
  st = cublasLtMatmulPreferenceCreate(&pref);
  if (st != CUBLAS_STATUS_SUCCESS) return LtError("cublasLtMatmulPreferenceCreate", st);
  const uint64_t ws = key.workspace_limit;
  const uint32_t aligns[4] = {key.align_b, key.align_a, key.align_c, key.align_c};  // A, B, C, D
  const cublasLtMatmulPreferenceAttributes_t align_attrs[4] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                            sizeof(ws));
  for (int i = 0; i < 4 && st == CUBLAS_STATUS_SUCCESS; ++i) {
    st = cublasLtMatmulPreferenceSetAttribute(pref, align_attrs[i], &aligns[i], sizeof(uint32_t));
  }
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  if (st == CUBLAS_STATUS_SUCCESS) {
    st = cublasLtMatmulAlgoGetHeuristic(state.handle, plan->desc, plan->lt_a, plan->lt_b,
                                        plan->lt_c, plan->lt_c, pref, 1, &result, &found);
  }
  cublasLtMatmulPreferenceDestroy(pref);
  if (st != CUBLAS_STATUS_SUCCESS) return LtError("cublasLtMatmulAlgoGetHeuristic", st);
  if (found == 0 || result.state != CUBLAS_STATUS_SUCCESS) {
    return "cublasLtMatmulAlgoGetHeuristic: no algorithm for " + ShapeText(key);
  }
  plan->algo = result.algo;
  plan->workspace_bytes = result.workspaceSize;
  return "";
}

// Finds or builds the plan for `key`; nullptr with *error set on failure.
GemmPlan* FindPlan(GemmState& state, const GemmKey& key, std::string* error) {
  for (GemmPlan& p : state.plans) {
    if (p.key == key) return &p;
  }
  GemmPlan plan;
  *error = BuildPlan(state, key, &plan);
  if (!error->empty()) {
    DestroyPlan(plan);
    return nullptr;
  }
  if (state.plans.size() < kMaxPlans) {
    state.plans.push_back(plan);
    return &state.plans.back();
  }
  GemmPlan& slot = state.plans[state.next_evict];
  state.next_evict = (state.next_evict + 1) % kMaxPlans;
  DestroyPlan(slot);  // host-side descriptors: safe while earlier matmuls still run
  slot = plan;
  return &slot;
}

std::string RunLt(GemmState& state, cudaStream_t stream, const GemmKey& key, void* c,
                  const void* a, const void* b, float alpha, float beta) {
  std::string error;
  GemmPlan* plan = FindPlan(state, key, &error);
  if (plan == nullptr) return error;
  void* workspace = plan->workspace_bytes > 0 ? state.workspace : nullptr;
  const cublasStatus_t st =
      cublasLtMatmul(state.handle, plan->desc, &alpha, b, plan->lt_a, a, plan->lt_b, &beta, c,
                     plan->lt_c, c, plan->lt_c, &plan->algo, workspace, plan->workspace_bytes,
                     stream);
  if (st != CUBLAS_STATUS_SUCCESS) return LtError("cublasLtMatmul", st) + " for " + ShapeText(key);
  return "";
}

// f32 x f32 -> bf16: f32 products into the workspace, `rows_per_chunk` rows of c at a time, then
// c = round(tmp + beta * c). The matmuls get no workspace of their own.
std::string GemmF32ToBf16(GemmState& state, cudaStream_t stream, GemmKey key, void* c,
                          const void* a, const void* b, float alpha, float beta) {
  const int64_t m = key.m, n = key.n, ldc = key.ldc, lda = key.lda;
  const int64_t capacity = static_cast<int64_t>(kWorkspaceBytes / sizeof(float));
  if (n > capacity) {
    return "Gemm f32 x f32 -> bf16: n too large for the f32 workspace buffer, " + ShapeText(key);
  }
  const int64_t rows_per_chunk = std::min(m, capacity / n);
  float* tmp = static_cast<float*>(state.workspace);
  for (int64_t r0 = 0; r0 < m; r0 += rows_per_chunk) {
    const int64_t rows = std::min(rows_per_chunk, m - r0);
    // Rows r0.. of op(a): rows of a, or columns of a when it is stored transposed ([K, M]).
    const float* a_chunk = static_cast<const float*>(a) + (key.trans_a ? r0 : r0 * lda);
    GemmKey chunk = key;
    chunk.c_dtype = DType::kF32;
    chunk.m = rows;
    chunk.ldc = n;
    chunk.align_a = PointerAlignment(a_chunk);
    chunk.align_c = PointerAlignment(tmp);
    chunk.workspace_limit = 0;
    std::string error = RunLt(state, stream, chunk, tmp, a_chunk, b, alpha, 0.0f);
    if (!error.empty()) return error;
    error = LaunchEpilogue(stream, DType::kBF16, static_cast<bf16*>(c) + r0 * ldc, ldc, tmp, n,
                           rows, n, beta);
    if (!error.empty()) return error;
  }
  return "";
}

}  // namespace

std::string Gemm(GemmState& state, cudaStream_t stream, DType ab_dtype, DType c_dtype, void* c,
                 int64_t ldc, const void* a, int64_t lda, const void* b, int64_t ldb, int64_t m,
                 int64_t n, int64_t k, bool trans_a, bool trans_b, float alpha, float beta) {
  const GemmKey key{ab_dtype, c_dtype, m, n, k, lda, ldb, ldc, trans_a, trans_b,
                    PointerAlignment(a), PointerAlignment(b), PointerAlignment(c),
                    kWorkspaceBytes};
  const bool dtypes_ok = (ab_dtype == DType::kF32 || ab_dtype == DType::kBF16) &&
                         (c_dtype == DType::kF32 || c_dtype == DType::kBF16);
  if (!dtypes_ok) return "Gemm: a/b must be f32 or bf16 and c f32 or bf16, got " + ShapeText(key);
  if (m < 0 || n < 0 || k < 0 || ldc < n || lda < (trans_a ? m : k) || ldb < (trans_b ? k : n)) {
    return "Gemm: bad sizes or leading dimensions (row strides): " + ShapeText(key);
  }
  if (m == 0 || n == 0) return "";
  if (k == 0) return LaunchEpilogue(stream, c_dtype, c, ldc, nullptr, 0, m, n, beta);
  if (ab_dtype == DType::kF32 && c_dtype == DType::kBF16) {
    return GemmF32ToBf16(state, stream, key, c, a, b, alpha, beta);
  }
  return RunLt(state, stream, key, c, a, b, alpha, beta);
}

GemmState* CreateGemmState(std::string* error) {
  auto* state = new GemmState();
  cudaError_t err = cudaGetDevice(&state->device);
  if (err != cudaSuccess) {
    *error = std::string("cudaGetDevice: ") + cudaGetErrorString(err);
    delete state;
    return nullptr;
  }
  const cublasStatus_t st = cublasLtCreate(&state->handle);
  if (st != CUBLAS_STATUS_SUCCESS) {
    *error = LtError("cublasLtCreate", st);
    delete state;
    return nullptr;
  }
  err = cudaMalloc(&state->workspace, kWorkspaceBytes);
  if (err != cudaSuccess) {
    *error = std::string("cudaMalloc(cuBLASLt workspace, 32 MiB): ") + cudaGetErrorString(err);
    cublasLtDestroy(state->handle);
    delete state;
    return nullptr;
  }
  state->plans.reserve(kMaxPlans);
  return state;
}

void DestroyGemmState(GemmState* state) {
  if (state == nullptr) return;
  for (GemmPlan& p : state->plans) DestroyPlan(p);
  if (state->handle != nullptr) cublasLtDestroy(state->handle);
  if (state->workspace != nullptr) {
    int previous = 0;
    const bool restore = cudaGetDevice(&previous) == cudaSuccess && previous != state->device;
    if (restore) cudaSetDevice(state->device);
    cudaFree(state->workspace);  // synchronizes with work still using it
    if (restore) cudaSetDevice(previous);
  }
  delete state;
}

}  // namespace tandem::ops::cuda
