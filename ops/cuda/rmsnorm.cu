// RMSNorm forward and backward (ops::RmsNormForward/RmsNormBackward).
//
// One block per row; 16-byte packs when every row start is aligned (pointers and row strides)
// and cols is a multiple of the pack, scalar accesses otherwise. All math in f32.
//   forward:  rstd = 1 / sqrt(sum(x^2) / C + eps); y = x * rstd * w
//   backward: g = dy * w; dx = rstd * g - x * (rstd^3 / C) * sum(g * x)
//             dw += sum over rows of dy * x * rstd
// dw is deterministic without atomics: a fixed partition of the rows (row groups, a function of
// `rows` only) is summed per column into scratch [groups, C], each group's rows in order, and a
// second kernel adds the groups to dw in a fixed order. With dw the backward is one pass over dy
// and x (RmsNormBackwardFusedKernel: a block per row group computes dx row by row and keeps the
// group's dw sums in registers) when a row fits in the block's registers; otherwise, and without
// dw, the partial-sum kernel runs before a block-per-row dx kernel. dx may alias dy or x: every
// thread reads its columns of a row before it writes them.
#include "ops/cuda/common.cuh"
#include "ops/internal/cuda_kernels.h"

namespace tandem::ops::cuda {
namespace {

constexpr int64_t kMaxRowGroups = 512;
constexpr int kDwThreads = 256;

int64_t RowGroups(int64_t rows) { return std::min(rows, kMaxRowGroups); }

// y = x * rs * w over this thread's packs of one row (the forward's second pass).
template <typename T, int V>
__device__ __forceinline__ void ScaleRow(T* yr, const T* xr, const T* w, float rs, int64_t cols) {
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * V; c < cols; c += blockDim.x * V) {
    const Pack<T, V> xp = LoadPack<T, V>(xr + c);
    const Pack<T, V> wp = LoadPack<T, V>(w + c);
    Pack<T, V> yp;
#pragma unroll
    for (int i = 0; i < V; ++i) yp.v[i] = FromFloat<T>(ToFloat(xp.v[i]) * rs * ToFloat(wp.v[i]));
    StorePack<T, V>(yr + c, yp);
  }
}

template <typename T, int V>
__global__ void RmsNormForwardKernel(T* y, int64_t y_stride, float* rstd, const T* x,
                                     int64_t x_stride, const T* w, int64_t rows, int64_t cols,
                                     float eps) {
  __shared__ float shared[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * x_stride;
    T* yr = y + r * y_stride;
    float ss = 0.0f;
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * V; c < cols; c += blockDim.x * V) {
      const Pack<T, V> xp = LoadPack<T, V>(xr + c);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float f = ToFloat(xp.v[i]);
        ss += f * f;
      }
    }
    ss = BlockSum(ss, shared);
    const float rs = 1.0f / sqrtf(ss / static_cast<float>(cols) + eps);
    if (rstd != nullptr && threadIdx.x == 0) rstd[r] = rs;
    ScaleRow<T, V>(yr, xr, w, rs, cols);
  }
}

// sum = round(a + b), then y = sum * rstd * w: RmsNormForwardKernel's loops and reduction order
// over the rounded sum, so the result is that of Add followed by RmsNormForward with the same
// pack width. Each thread reads back only the elements it wrote (sum may alias a or b).
template <typename T, int V>
__global__ void AddRmsNormForwardKernel(T* sum, int64_t sum_stride, T* y, int64_t y_stride,
                                        const T* a, int64_t a_stride, const T* b, int64_t b_stride,
                                        const T* w, int64_t rows, int64_t cols, float eps) {
  __shared__ float shared[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* ar = a + r * a_stride;
    const T* br = b + r * b_stride;
    T* sr = sum + r * sum_stride;
    T* yr = y + r * y_stride;
    float ss = 0.0f;
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * V; c < cols; c += blockDim.x * V) {
      const Pack<T, V> ap = LoadPack<T, V>(ar + c);
      const Pack<T, V> bp = LoadPack<T, V>(br + c);
      Pack<T, V> sp;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        sp.v[i] = FromFloat<T>(ToFloat(ap.v[i]) + ToFloat(bp.v[i]));
        const float f = ToFloat(sp.v[i]);
        ss += f * f;
      }
      StorePack<T, V>(sr + c, sp);
    }
    ss = BlockSum(ss, shared);
    ScaleRow<T, V>(yr, sr, w, 1.0f / sqrtf(ss / static_cast<float>(cols) + eps), cols);
  }
}

template <typename T, int V>
__global__ void RmsNormBackwardDxKernel(T* dx, int64_t dx_stride, const T* dy, int64_t dy_stride,
                                        const T* x, int64_t x_stride, const T* w,
                                        const float* rstd, int64_t rows, int64_t cols,
                                        bool accumulate) {
  __shared__ float shared[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * x_stride;
    const T* dyr = dy + r * dy_stride;
    T* dxr = dx + r * dx_stride;
    float dot = 0.0f;  // sum over c of dy * w * x
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * V; c < cols; c += blockDim.x * V) {
      const Pack<T, V> xp = LoadPack<T, V>(xr + c);
      const Pack<T, V> gp = LoadPack<T, V>(dyr + c);
      const Pack<T, V> wp = LoadPack<T, V>(w + c);
#pragma unroll
      for (int i = 0; i < V; ++i) dot += ToFloat(gp.v[i]) * ToFloat(wp.v[i]) * ToFloat(xp.v[i]);
    }
    dot = BlockSum(dot, shared);  // also a barrier: every read of the row precedes any write
    const float rs = rstd[r];
    const float coef = dot * (rs * rs * rs) / static_cast<float>(cols);
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * V; c < cols; c += blockDim.x * V) {
      const Pack<T, V> xp = LoadPack<T, V>(xr + c);
      const Pack<T, V> gp = LoadPack<T, V>(dyr + c);
      const Pack<T, V> wp = LoadPack<T, V>(w + c);
      Pack<T, V> out;
      if (accumulate) out = LoadPack<T, V>(dxr + c);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        float v = rs * (ToFloat(gp.v[i]) * ToFloat(wp.v[i])) - ToFloat(xp.v[i]) * coef;
        if (accumulate) v += ToFloat(out.v[i]);
        out.v[i] = FromFloat<T>(v);
      }
      StorePack<T, V>(dxr + c, out);
    }
  }
}

// partial[g, c] = sum over rows of group g (in order) of dy * x * rstd.
template <typename T>
__global__ void RmsNormDwPartialKernel(float* partial, const T* dy, int64_t dy_stride, const T* x,
                                       int64_t x_stride, const float* rstd, int64_t rows,
                                       int64_t cols, int64_t rows_per_group) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const int64_t g = blockIdx.y;
  const int64_t r_end = std::min(rows, (g + 1) * rows_per_group);
  float sum = 0.0f;
  for (int64_t r = g * rows_per_group; r < r_end; ++r) {
    sum += ToFloat(dy[r * dy_stride + c]) * ToFloat(x[r * x_stride + c]) * rstd[r];
  }
  partial[g * cols + c] = sum;
}

// The one-pass backward with dw: block g owns rows [g * rows_per_group, ...) and, per thread,
// kPacks packs of V columns (c = (threadIdx.x + k * blockDim.x) * V); for each row in order it
// forms the dot (block sum), writes dx and adds dy * x * rstd to its registers; partial[g, c]
// at the end. The next row's dy and x are loaded before the current row's block sum.
template <typename T>
struct FusedBackwardArgs {
  float* partial;
  T* dx;
  int64_t dx_stride;
  const T* dy;
  int64_t dy_stride;
  const T* x;
  int64_t x_stride;
  const T* w;
  const float* rstd;
  int64_t rows, cols, rows_per_group;
  bool accumulate;
};

template <typename T, int V, int kPacks>
__global__ void RmsNormBackwardFusedKernel(const FusedBackwardArgs<T> a) {
  float* const partial = a.partial;
  T* const dx = a.dx;
  const T* const dy = a.dy;
  const T* const x = a.x;
  const T* const w = a.w;
  const int64_t dx_stride = a.dx_stride, dy_stride = a.dy_stride, x_stride = a.x_stride;
  const int64_t rows = a.rows, cols = a.cols, rows_per_group = a.rows_per_group;
  const bool accumulate = a.accumulate;
  const float* const rstd = a.rstd;
  __shared__ float shared[32];
  const int64_t r_begin = static_cast<int64_t>(blockIdx.x) * rows_per_group;
  const int64_t r_end = std::min(rows, r_begin + rows_per_group);
  int64_t col[kPacks];
  bool active[kPacks];
  Pack<T, V> wp[kPacks], xp[kPacks], gp[kPacks];
  float acc[kPacks][V];
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    col[k] = (static_cast<int64_t>(threadIdx.x) + k * blockDim.x) * V;
    active[k] = col[k] < cols;
    if (active[k]) wp[k] = LoadPack<T, V>(w + col[k]);
#pragma unroll
    for (int i = 0; i < V; ++i) acc[k][i] = 0.0f;
  }
  auto load_row = [&](int64_t r, Pack<T, V>(&xr)[kPacks], Pack<T, V>(&gr)[kPacks]) {
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      if (!active[k]) continue;
      xr[k] = LoadPack<T, V>(x + r * x_stride + col[k]);
      gr[k] = LoadPack<T, V>(dy + r * dy_stride + col[k]);
    }
  };
  if (r_begin < r_end) load_row(r_begin, xp, gp);
  for (int64_t r = r_begin; r < r_end; ++r) {
    Pack<T, V> xn[kPacks], gn[kPacks];
    if (r + 1 < r_end) load_row(r + 1, xn, gn);
    float dot = 0.0f;  // sum over c of dy * w * x
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      if (!active[k]) continue;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        dot += ToFloat(gp[k].v[i]) * ToFloat(wp[k].v[i]) * ToFloat(xp[k].v[i]);
      }
    }
    dot = BlockSum(dot, shared);
    const float rs = rstd[r];
    const float coef = dot * (rs * rs * rs) / static_cast<float>(cols);
    T* dxr = dx + r * dx_stride;
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      if (!active[k]) continue;
      Pack<T, V> out;
      if (accumulate) out = LoadPack<T, V>(dxr + col[k]);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float g = ToFloat(gp[k].v[i]), xv = ToFloat(xp[k].v[i]);
        float v = rs * (g * ToFloat(wp[k].v[i])) - xv * coef;
        if (accumulate) v += ToFloat(out.v[i]);
        out.v[i] = FromFloat<T>(v);
        acc[k][i] += g * xv * rs;
      }
      StorePack<T, V>(dxr + col[k], out);
    }
#pragma unroll
    for (int k = 0; k < kPacks; ++k) xp[k] = xn[k], gp[k] = gn[k];
  }
  float* pr = partial + static_cast<int64_t>(blockIdx.x) * cols;
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    if (!active[k]) continue;
#pragma unroll
    for (int i = 0; i < V; ++i) pr[col[k] + i] = acc[k][i];
  }
}

// Launches the one-pass backward over `packs` packs of V columns a row with 1, 2 or 4 packs a
// thread (at most 512 threads); false when a row needs more.
template <typename T, int V>
bool LaunchFusedBackward(cudaStream_t stream, int64_t groups, int64_t packs,
                         const FusedBackwardArgs<T>& args) {
  const int per_thread = packs <= 512 ? 1 : packs <= 1024 ? 2 : packs <= 2048 ? 4 : 0;
  const unsigned grid = static_cast<unsigned>(groups);
  switch (per_thread) {
    case 1:
      RmsNormBackwardFusedKernel<T, V, 1><<<grid, ThreadsFor(packs, 512), 0, stream>>>(args);
      return true;
    case 2:
      RmsNormBackwardFusedKernel<T, V, 2>
          <<<grid, ThreadsFor(CeilDiv(packs, 2), 512), 0, stream>>>(args);
      return true;
    case 4:
      RmsNormBackwardFusedKernel<T, V, 4>
          <<<grid, ThreadsFor(CeilDiv(packs, 4), 512), 0, stream>>>(args);
      return true;
    default:
      return false;
  }
}

// dw[c] += sum over groups of partial[g, c]: a block of kReduceWarps warps per 32 columns, warp
// j summing groups j, j + kReduceWarps, ... in order, then the warps' sums in warp order.
constexpr int kReduceWarps = 8;
__global__ void RmsNormDwReduceKernel(float* dw, const float* partial, int64_t groups,
                                      int64_t cols) {
  __shared__ float sums[kReduceWarps][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  float sum = 0.0f;
  if (c < cols) {
    for (int64_t g = warp; g < groups; g += kReduceWarps) sum += partial[g * cols + c];
  }
  sums[warp][lane] = sum;
  __syncthreads();
  if (warp != 0 || c >= cols) return;
  float total = 0.0f;
#pragma unroll
  for (int j = 0; j < kReduceWarps; ++j) total += sums[j][lane];
  dw[c] += total;
}

}  // namespace

cudaError_t RmsNormForward(cudaStream_t stream, DType dtype, void* y, int64_t y_stride,
                           float* rstd, const void* x, int64_t x_stride, const void* w,
                           int64_t rows, int64_t cols, float eps) {
  return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int kV = kVec16<T>;
    if (rows <= 0 || cols <= 0) return cudaSuccess;
    T* yt = static_cast<T*>(y);
    const T* xt = static_cast<const T*>(x);
    const T* wt = static_cast<const T*>(w);
    if (RowsVectorizable<T>(cols, {y, x, w}, {y_stride, x_stride})) {
      RmsNormForwardKernel<T, kV><<<RowGrid(rows), ThreadsFor(cols / kV, 512), 0, stream>>>(
          yt, y_stride, rstd, xt, x_stride, wt, rows, cols, eps);
    } else {
      RmsNormForwardKernel<T, 1><<<RowGrid(rows), ThreadsFor(cols, 512), 0, stream>>>(
          yt, y_stride, rstd, xt, x_stride, wt, rows, cols, eps);
    }
    return cudaGetLastError();
  });
}

cudaError_t AddRmsNormForward(cudaStream_t stream, DType dtype, void* sum, int64_t sum_stride,
                              void* y, int64_t y_stride, const void* a, int64_t a_stride,
                              const void* b, int64_t b_stride, const void* w, int64_t rows,
                              int64_t cols, float eps) {
  return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int kV = kVec16<T>;
    if (rows <= 0 || cols <= 0) return cudaSuccess;
    T* st = static_cast<T*>(sum);
    T* yt = static_cast<T*>(y);
    const T* at = static_cast<const T*>(a);
    const T* bt = static_cast<const T*>(b);
    const T* wt = static_cast<const T*>(w);
    if (RowsVectorizable<T>(cols, {sum, y, a, b, w}, {sum_stride, y_stride, a_stride, b_stride})) {
      AddRmsNormForwardKernel<T, kV><<<RowGrid(rows), ThreadsFor(cols / kV, 512), 0, stream>>>(
          st, sum_stride, yt, y_stride, at, a_stride, bt, b_stride, wt, rows, cols, eps);
    } else {
      AddRmsNormForwardKernel<T, 1><<<RowGrid(rows), ThreadsFor(cols, 512), 0, stream>>>(
          st, sum_stride, yt, y_stride, at, a_stride, bt, b_stride, wt, rows, cols, eps);
    }
    return cudaGetLastError();
  });
}

size_t RmsNormBackwardScratchBytes(int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) return 0;
  return static_cast<size_t>(RowGroups(rows) * cols) * sizeof(float);
}

cudaError_t RmsNormBackward(cudaStream_t stream, DType dtype, void* dx, int64_t dx_stride,
                            float* dw, const void* dy, int64_t dy_stride, const void* x,
                            int64_t x_stride, const void* w, const float* rstd, int64_t rows,
                            int64_t cols, bool accumulate_dx, void* scratch,
                            size_t scratch_bytes) {
  return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int kV = kVec16<T>;
    if (rows <= 0 || cols <= 0) return cudaSuccess;
    const T* dyt = static_cast<const T*>(dy);
    const T* xt = static_cast<const T*>(x);
    const int64_t groups = RowGroups(rows);
    const int64_t rows_per_group = CeilDiv(rows, groups);
    const unsigned reduce_blocks = static_cast<unsigned>(CeilDiv(cols, 32));
    if (dw != nullptr &&
        (scratch == nullptr || scratch_bytes < RmsNormBackwardScratchBytes(rows, cols))) {
      return cudaErrorInvalidValue;
    }
    float* partial = static_cast<float*>(scratch);
    if (dw != nullptr && dx != nullptr) {  // one pass when a row fits in registers
      const bool vec = RowsVectorizable<T>(cols, {dx, dy, x, w}, {dx_stride, dy_stride, x_stride});
      const FusedBackwardArgs<T> args{
          partial,      static_cast<T*>(dx),      dx_stride, dyt,  dy_stride, xt,
          x_stride,     static_cast<const T*>(w), rstd,      rows, cols,      rows_per_group,
          accumulate_dx};
      const bool launched = vec ? LaunchFusedBackward<T, kV>(stream, groups, cols / kV, args)
                                : LaunchFusedBackward<T, 1>(stream, groups, cols, args);
      if (launched) {
        RmsNormDwReduceKernel<<<reduce_blocks, kReduceWarps * 32, 0, stream>>>(dw, partial, groups,
                                                                               cols);
        return cudaGetLastError();
      }
    }
    if (dw != nullptr) {
      const dim3 grid(static_cast<unsigned>(CeilDiv(cols, kDwThreads)),
                      static_cast<unsigned>(groups));
      RmsNormDwPartialKernel<T><<<grid, kDwThreads, 0, stream>>>(
          partial, dyt, dy_stride, xt, x_stride, rstd, rows, cols, rows_per_group);
      RmsNormDwReduceKernel<<<reduce_blocks, kReduceWarps * 32, 0, stream>>>(dw, partial, groups,
                                                                             cols);
    }
    if (dx != nullptr) {
      T* dxt = static_cast<T*>(dx);
      const T* wt = static_cast<const T*>(w);
      if (RowsVectorizable<T>(cols, {dx, dy, x, w}, {dx_stride, dy_stride, x_stride})) {
        RmsNormBackwardDxKernel<T, kV><<<RowGrid(rows), ThreadsFor(cols / kV, 512), 0, stream>>>(
            dxt, dx_stride, dyt, dy_stride, xt, x_stride, wt, rstd, rows, cols, accumulate_dx);
      } else {
        RmsNormBackwardDxKernel<T, 1><<<RowGrid(rows), ThreadsFor(cols, 512), 0, stream>>>(
            dxt, dx_stride, dyt, dy_stride, xt, x_stride, wt, rstd, rows, cols, accumulate_dx);
      }
    }
    return cudaGetLastError();
  });
}

}  // namespace tandem::ops::cuda
