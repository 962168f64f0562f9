// Segmented multi-adapter LoRA kernels (ops/lora.h). Correct first, simple shared-memory tiling:
//
// Token kernels (shrink, expand and their input gradients): one thread block per (tile of
// kLoraTileRows tokens of one segment, block of kBN output columns). The block loops over the
// reduction dimension K in steps of kBK, staging a [kBM, kBK] slice of the token rows and a
// [kBK, kBN] slice of the adapter's weight in shared memory as f32, and each thread accumulates a
// 2 x 4 block of outputs in f32 registers. Each output element is produced by exactly one thread,
// summing k in increasing order: deterministic.
//
//   mode          rows (K-dim input)          weight view W(k, j)         N      K
//   kShrink       drop(x) [N, in]             A[j, k]   (A [r, in])       r      in
//   kExpand       h (packed [len, r])         B[j, k]   (B [out, r])      out    r
//   kExpandGrad   dy [N, out]                 B[k, j]                     r      out
//   kShrinkGrad   dh (packed)                 A[k, j]                     in     r
//
// Thin batches (decode: few tokens per adapter, at most kGatherMaxTokens in all) run the forward
// (shrink, expand) through gather kernels instead, since a 32-row tile holding 4 tokens wastes
// most of its block:
//   shrink: one warp per (token, rank row j): a dot product of x's row and A's row j over `in`,
//           lanes on 16-byte vectors, then a fixed-order butterfly sum; grid (tile, j / 8, row).
//   expand: one thread per (tile, output column c): B's row c read once, every token of the tile
//           accumulated in registers (j ascending, fmaf, as the tiled kernel); the tile's h rows
//           in shared memory as f32.
// Both are deterministic; LoraDelta runs the same two kernels as LoraShrink + LoraExpand.
//
// Weight-gradient kernels: one block per (adapter, kGP x kGQ tile of the gradient). The block
// walks the adapter's segments in increasing order and their tokens in steps of kGT, staging
// [kGT, kGP] and [kGT, kGQ] slices, and each thread keeps a 4 x 4 block of sums; at the end it
// adds its sums to the f32 gradient, which no other block touches: deterministic, no atomics.
//   dA_a[j, c] += sum_n dh[n, j] drop(x)[n, c]        (P = r,   Q = in)
//   dB_a[o, j] += s_a * sum_n dy[n, o] h[n, j]        (P = out, Q = r)
// The parallelism of these kernels is (P / 64) * (Q / 64) blocks per adapter, each with a serial
// loop over the adapter's tokens; a split over tokens with a fixed-order second pass is the next
// step for speed.
#include <type_traits>

#include "ops/cuda/common.cuh"
#include "ops/internal/lora_kernels.h"

namespace tandem::ops::cuda {
namespace {

using lora::AdapterRecord;
using lora::DropoutScale;
using lora::SegmentRecord;
using lora::SegmentsView;
using lora::TileRecord;
using lora::WeightsView;

constexpr int kBM = lora::kLoraTileRows;  // 32 tokens
constexpr int kBN = 64;
constexpr int kBK = 32;
constexpr int kThreads = 256;  // 16 x 16: 2 rows x 4 columns per thread
static_assert(kBM == 32, "the thread layout below assumes 32-token tiles");

enum class Mode { kShrink, kExpand, kExpandGrad, kShrinkGrad };

struct TokenArgs {
  void* out;         // h / y / dh / dx
  int64_t ld_out;    // row stride of y or dx
  const void* rows;  // x / h / dy / dh
  int64_t ld_rows;   // row stride of x or dy
  SegmentsView segs;
  WeightsView w;
  uint64_t seed;
  // [split-K] Packed-output modes: blockIdx.z sums k in [z * kslice, (z + 1) * kslice) into
  // partial[z * h_numel + i] (f32) instead of writing `out`; null: one slice, straight to out.
  float* partial = nullptr;
  int64_t kslice = 0;
  // [fused delta] kExpand: h is read as the sum of in_splits f32 slices of partial_in (each
  // [h_numel]) rounded to T, not from `rows`.
  const float* partial_in = nullptr;
  int in_splits = 0;
};

template <Mode M>
__device__ __forceinline__ bool RowsArePacked() {
  return M == Mode::kExpand || M == Mode::kShrinkGrad;
}
template <Mode M>
__device__ __forceinline__ bool OutIsPacked() {
  return M == Mode::kShrink || M == Mode::kExpandGrad;
}

constexpr bool OutIsPackedHost(Mode m) { return m == Mode::kShrink || m == Mode::kExpandGrad; }

template <typename T, Mode M>
__global__ void __launch_bounds__(kThreads) LoraTokenKernel(TokenArgs args) {
  // Steps of kK along the reduction: kBK, or 16 when it runs over a rank (expand, shrink grad),
  // so ranks of 8 or 16 (or 24, 40, ...) do not pay for a 32-wide step of zeros. Each output
  // still sums its k in increasing order in one thread.
  constexpr int kK = (M == Mode::kExpand || M == Mode::kShrinkGrad) ? 16 : kBK;
  __shared__ float xs[kK][kBM + 1];  // token rows, transposed: xs[k][m]
  __shared__ float ws[kK][kBN + 1];  // weight slice: ws[k][j]
  const TileRecord tile = args.segs.tiles[blockIdx.x];
  const SegmentRecord seg = args.segs.segments[tile.segment];
  const AdapterRecord ad = args.w.adapters[seg.adapter];
  const int64_t r = seg.rank, in = args.w.in, out = args.w.out;
  const int64_t ncols = (M == Mode::kShrink || M == Mode::kExpandGrad) ? r
                        : M == Mode::kExpand                           ? out
                                                                       : in;
  const int64_t kdim = M == Mode::kShrink ? in : M == Mode::kExpandGrad ? out : r;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  if (n0 >= ncols) return;
  const int rows = min(kBM, seg.end - seg.start - tile.row0);
  const int64_t token0 = seg.start + tile.row0;  // global row of tile row 0
  const int64_t packed0 = seg.h_offset + static_cast<int64_t>(tile.row0) * r;
  const T* src = static_cast<const T*>(args.rows);
  const T* W = static_cast<const T*>(M == Mode::kShrink || M == Mode::kShrinkGrad ? ad.a : ad.b);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  // [split-K] This block's slice of the reduction.
  const int64_t kbegin = args.partial != nullptr ? static_cast<int64_t>(blockIdx.z) * args.kslice : 0;
  const int64_t kend = args.partial != nullptr ? min(kdim, kbegin + args.kslice) : kdim;
  float acc[2][4] = {};
  for (int64_t k0 = kbegin; k0 < kend; k0 += kK) {
    for (int e = tid; e < kBM * kK; e += kThreads) {
      const int m = e / kK, k = e % kK;
      const int64_t kk = k0 + k;
      float v = 0.0f;
      if (m < rows && kk < kend) {
        if (M == Mode::kExpand && args.partial_in != nullptr) {
          const int64_t i = packed0 + m * r + kk;
          float sum = 0.0f;  // the split-sum pass's order and rounding
          for (int s = 0; s < args.in_splits; ++s) sum += args.partial_in[s * args.segs.h_numel + i];
          v = ToFloat(FromFloat<T>(sum));
        } else if (RowsArePacked<M>()) {
          v = ToFloat(src[packed0 + m * r + kk]);
        } else {
          v = ToFloat(src[(token0 + m) * args.ld_rows + kk]);
          if (M == Mode::kShrink) v *= DropoutScale(args.seed, token0 + m, kk, ad.dropout);
        }
      }
      xs[k][m] = v;
    }
    for (int e = tid; e < kK * kBN; e += kThreads) {
      // NT modes read W[j, k] (k contiguous); NN modes read W[k, j] (j contiguous).
      const bool nt = M == Mode::kShrink || M == Mode::kExpand;
      const int j = nt ? e / kK : e % kBN;
      const int k = nt ? e % kK : e / kBN;
      const int64_t jj = n0 + j, kk = k0 + k;
      float v = 0.0f;
      if (jj < ncols && kk < kend) v = ToFloat(nt ? W[jj * kdim + kk] : W[kk * ncols + jj]);
      ws[k][j] = v;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kK; ++k) {
      const float a0 = xs[k][ty], a1 = xs[k][ty + 16];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float b = ws[k][tx + 16 * j];
        acc[0][j] = fmaf(a0, b, acc[0][j]);
        acc[1][j] = fmaf(a1, b, acc[1][j]);
      }
    }
    __syncthreads();
  }
  T* dst = static_cast<T*>(args.out);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int m = ty + 16 * i;
    if (m >= rows) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = n0 + tx + 16 * j;
      if (col >= ncols) continue;
      const float v = acc[i][j];
      if (OutIsPacked<M>() && args.partial != nullptr) {
        args.partial[blockIdx.z * args.segs.h_numel + packed0 + m * r + col] =
            M == Mode::kExpandGrad ? ad.scale * v : v;
      } else if (OutIsPacked<M>()) {
        dst[packed0 + m * r + col] = FromFloat<T>(M == Mode::kExpandGrad ? ad.scale * v : v);
      } else {
        T* p = dst + (token0 + m) * args.ld_out + col;
        const float delta = M == Mode::kExpand
                                ? ad.scale * v
                                : DropoutScale(args.seed, token0 + m, col, ad.dropout) * v;
        *p = FromFloat<T>(ToFloat(*p) + delta);
      }
    }
  }
}

// ---- Thin batches: gather kernels (see the top of the file) ----

constexpr int64_t kGatherMaxTokens = 256;
constexpr int32_t kGatherMaxRank = 256;  // the expand's h rows: 32 x 256 f32 of shared memory
constexpr int kGatherWarps = 8;
constexpr int kGatherCols = 128;

bool UseGather(const SegmentsView& segs) {
  return segs.num_tokens <= kGatherMaxTokens && segs.max_rank <= kGatherMaxRank &&
         segs.max_tile_rows > 0;
}

__device__ __forceinline__ bool Aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// h[row, j] = sum_k drop(x[row, k]) A[j, k] for row `blockIdx.z` of tile `blockIdx.x` and j =
// 8 blockIdx.y + warp.
template <typename T>
__global__ void __launch_bounds__(32 * kGatherWarps)
    LoraGatherShrinkKernel(T* h, const T* x, int64_t ldx, SegmentsView segs, WeightsView w,
                           uint64_t seed) {
  const TileRecord tile = segs.tiles[blockIdx.x];
  const SegmentRecord seg = segs.segments[tile.segment];
  const int m = static_cast<int>(blockIdx.z);
  const int rows = min(kBM, seg.end - seg.start - tile.row0);
  const int j = static_cast<int>(blockIdx.y) * kGatherWarps + static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  if (m >= rows || j >= seg.rank) return;  // whole warps leave together
  const AdapterRecord ad = w.adapters[seg.adapter];
  const int64_t in = w.in, token = seg.start + tile.row0 + m;
  const T* xr = x + token * ldx;
  const T* ar = static_cast<const T*>(ad.a) + j * in;
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  float sum = 0.0f;
  if (ad.dropout <= 0.0f && in % V == 0 && Aligned16(xr) && Aligned16(ar)) {
#pragma unroll 4
    for (int64_t k = static_cast<int64_t>(lane) * V; k < in; k += 32 * V) {
      const Pack<T, V> xp = LoadPack<T, V>(xr + k);
      const Pack<T, V> ap = LoadPack<T, V>(ar + k);
#pragma unroll
      for (int i = 0; i < V; ++i) sum = fmaf(ToFloat(xp.v[i]), ToFloat(ap.v[i]), sum);
    }
  } else {
    for (int64_t k = lane; k < in; k += 32) {
      const float xv = ToFloat(xr[k]) * DropoutScale(seed, token, k, ad.dropout);
      sum = fmaf(xv, ToFloat(ar[k]), sum);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) {
    h[seg.h_offset + static_cast<int64_t>(tile.row0 + m) * seg.rank + j] = FromFloat<T>(sum);
  }
}

// y[row, c] += s_a * sum_j h[row, j] B[c, j] for every row of tile `blockIdx.x`, c = 128
// blockIdx.y + thread. kRows >= the rows of any tile (the batch's max_tile_rows rounded up to a
// power of two), so the per-row sums stay in registers without dead work for absent rows.
template <typename T, int kRows>
__global__ void __launch_bounds__(kGatherCols)
    LoraGatherExpandKernel(T* y, int64_t ldy, const T* h, SegmentsView segs, WeightsView w) {
  extern __shared__ float hs[];  // [rows, r]
  const TileRecord tile = segs.tiles[blockIdx.x];
  const SegmentRecord seg = segs.segments[tile.segment];
  const int rows = min(kRows, seg.end - seg.start - tile.row0);
  const int r = seg.rank;
  const int64_t packed0 = seg.h_offset + static_cast<int64_t>(tile.row0) * r;
  for (int i = threadIdx.x; i < rows * r; i += blockDim.x) hs[i] = ToFloat(h[packed0 + i]);
  for (int i = rows * r + threadIdx.x; i < kRows * r; i += blockDim.x) hs[i] = 0.0f;
  __syncthreads();
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kGatherCols + threadIdx.x;
  if (c >= w.out) return;
  const AdapterRecord ad = w.adapters[seg.adapter];
  const T* br = static_cast<const T*>(ad.b) + c * r;
  float acc[kRows];
#pragma unroll
  for (int m = 0; m < kRows; ++m) acc[m] = 0.0f;
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  if (r % V == 0 && Aligned16(br)) {
    for (int j0 = 0; j0 < r; j0 += V) {
      const Pack<T, V> bp = LoadPack<T, V>(br + j0);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float b = ToFloat(bp.v[e]);
#pragma unroll
        for (int m = 0; m < kRows; ++m) acc[m] = fmaf(hs[m * r + j0 + e], b, acc[m]);
      }
    }
  } else {
    for (int j = 0; j < r; ++j) {
      const float b = ToFloat(br[j]);
#pragma unroll
      for (int m = 0; m < kRows; ++m) acc[m] = fmaf(hs[m * r + j], b, acc[m]);
    }
  }
  const int64_t token0 = seg.start + tile.row0;
#pragma unroll
  for (int m = 0; m < kRows; ++m) {
    if (m >= rows) break;
    T* p = y + (token0 + m) * ldy + c;
    *p = FromFloat<T>(ToFloat(*p) + ad.scale * acc[m]);
  }
}

template <typename T>
cudaError_t LaunchGatherShrink(cudaStream_t stream, void* h, const void* x, int64_t ldx,
                               const SegmentsView& segs, const WeightsView& w, uint64_t seed) {
  if (segs.num_tiles == 0 || segs.max_rank <= 0) return cudaSuccess;
  const dim3 grid(
      static_cast<unsigned>(segs.num_tiles),
      static_cast<unsigned>(CeilDiv(static_cast<int64_t>(segs.max_rank), int64_t{kGatherWarps})),
      static_cast<unsigned>(segs.max_tile_rows));
  LoraGatherShrinkKernel<T><<<grid, 32 * kGatherWarps, 0, stream>>>(
      static_cast<T*>(h), static_cast<const T*>(x), ldx, segs, w, seed);
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchGatherExpand(cudaStream_t stream, void* y, int64_t ldy, const void* h,
                               const SegmentsView& segs, const WeightsView& w) {
  if (segs.num_tiles == 0 || segs.max_rank <= 0 || w.out <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(segs.num_tiles),
                  static_cast<unsigned>(CeilDiv(w.out, int64_t{kGatherCols})));
  auto launch = [&](auto rows_tag) {
    constexpr int kRows = decltype(rows_tag)::value;
    const size_t smem = static_cast<size_t>(kRows) * segs.max_rank * sizeof(float);
    LoraGatherExpandKernel<T, kRows><<<grid, kGatherCols, smem, stream>>>(
        static_cast<T*>(y), ldy, static_cast<const T*>(h), segs, w);
    return cudaGetLastError();
  };
  const int rows = segs.max_tile_rows;
  if (rows <= 1) return launch(std::integral_constant<int, 1>());
  if (rows <= 2) return launch(std::integral_constant<int, 2>());
  if (rows <= 4) return launch(std::integral_constant<int, 4>());
  if (rows <= 8) return launch(std::integral_constant<int, 8>());
  if (rows <= 16) return launch(std::integral_constant<int, 16>());
  return launch(std::integral_constant<int, kBM>());
}

// [split-K] h[i] = sum over the slices in order (the packed-output modes' second pass).
template <typename T>
__global__ void LoraSplitSumKernel(T* h, const float* partial, int splits, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) sum += partial[s * n + i];
    h[i] = FromFloat<T>(sum);
  }
}

template <typename T, Mode M>
cudaError_t LaunchToken(cudaStream_t stream, TokenArgs args, int splits = 1) {
  if (args.segs.num_tiles == 0) return cudaSuccess;
  const int64_t ncols = (M == Mode::kShrink || M == Mode::kExpandGrad) ? args.segs.max_rank
                        : M == Mode::kExpand                           ? args.w.out
                                                                       : args.w.in;
  if (ncols <= 0) return cudaSuccess;
  const int64_t kdim = M == Mode::kShrink ? args.w.in : args.w.out;
  if (!OutIsPackedHost(M) || args.partial == nullptr || splits <= 1) {
    args.partial = nullptr;
    splits = 1;
  } else {  // slices of whole kBK steps; the last may be shorter, none empty
    args.kslice = CeilDiv(CeilDiv(kdim, static_cast<int64_t>(splits)), int64_t{kBK}) * kBK;
    splits = static_cast<int>(CeilDiv(kdim, args.kslice));
  }
  const dim3 grid(static_cast<unsigned>(args.segs.num_tiles),
                  static_cast<unsigned>(CeilDiv(ncols, kBN)), static_cast<unsigned>(splits));
  LoraTokenKernel<T, M><<<grid, kThreads, 0, stream>>>(args);
  if (args.partial == nullptr) return cudaGetLastError();
  const int64_t n = args.segs.h_numel;
  const int threads = 256;
  LoraSplitSumKernel<T><<<GridFor(n, threads), threads, 0, stream>>>(static_cast<T*>(args.out),
                                                                    args.partial, splits, n);
  return cudaGetLastError();
}

template <Mode M>
cudaError_t DispatchToken(cudaStream_t stream, DType dtype, const TokenArgs& args, int splits = 1) {
  return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    return LaunchToken<T, M>(stream, args, splits);
  });
}

// ---- weight gradients ----

constexpr int kGP = 64, kGQ = 64, kGT = 16;
enum class Grad { kA, kB };

struct GradArgs {
  const void* left;   // dh (packed) for kA, dy [N, out] for kB
  int64_t ld_left;    // row stride of dy
  const void* right;  // x [N, in] for kA, h (packed) for kB
  int64_t ld_right;   // row stride of x
  SegmentsView segs;
  WeightsView w;
  WeightsView grads;
  uint64_t seed;
};

template <typename T, Grad G>
__global__ void __launch_bounds__(kThreads) LoraWeightGradKernel(GradArgs args) {
  __shared__ float ls[kGT][kGP + 1];
  __shared__ float rs[kGT][kGQ + 1];
  const int a = blockIdx.x;
  const AdapterRecord ad = args.w.adapters[a];
  float* grad =
      static_cast<float*>(G == Grad::kA ? args.grads.adapters[a].a : args.grads.adapters[a].b);
  const int64_t r = ad.rank;
  if (grad == nullptr || r == 0) return;
  const int64_t P = G == Grad::kA ? r : args.w.out;
  const int64_t Q = G == Grad::kA ? args.w.in : r;
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * kGP;
  const int64_t q0 = static_cast<int64_t>(blockIdx.z) * kGQ;
  if (p0 >= P || q0 >= Q) return;
  const T* left = static_cast<const T*>(args.left);
  const T* right = static_cast<const T*>(args.right);
  const int tid = threadIdx.x, tq = tid % 16, tp = tid / 16;
  float acc[4][4] = {};
  const int32_t b0 = args.segs.adapter_seg_begin[a], b1 = args.segs.adapter_seg_begin[a + 1];
  for (int32_t i = b0; i < b1; ++i) {
    const SegmentRecord seg = args.segs.segments[args.segs.adapter_segs[i]];
    const int len = seg.end - seg.start;
    for (int t0 = 0; t0 < len; t0 += kGT) {
      for (int e = tid; e < kGT * kGP; e += kThreads) {
        const int t = e / kGP, p = e % kGP;
        const int64_t pp = p0 + p, n = seg.start + t0 + t;
        float v = 0.0f;
        if (t0 + t < len && pp < P) {
          v = G == Grad::kA ? ToFloat(left[seg.h_offset + static_cast<int64_t>(t0 + t) * r + pp])
                            : ToFloat(left[n * args.ld_left + pp]);
        }
        ls[t][p] = v;
      }
      for (int e = tid; e < kGT * kGQ; e += kThreads) {
        const int t = e / kGQ, q = e % kGQ;
        const int64_t qq = q0 + q, n = seg.start + t0 + t;
        float v = 0.0f;
        if (t0 + t < len && qq < Q) {
          if (G == Grad::kA) {
            v = ToFloat(right[n * args.ld_right + qq]) * DropoutScale(args.seed, n, qq, ad.dropout);
          } else {
            v = ToFloat(right[seg.h_offset + static_cast<int64_t>(t0 + t) * r + qq]);
          }
        }
        rs[t][q] = v;
      }
      __syncthreads();
#pragma unroll 4
      for (int t = 0; t < kGT; ++t) {
        float lv[4], rv[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          lv[u] = ls[t][tp + 16 * u];
          rv[u] = rs[t][tq + 16 * u];
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
#pragma unroll
          for (int v = 0; v < 4; ++v) acc[u][v] = fmaf(lv[u], rv[v], acc[u][v]);
        }
      }
      __syncthreads();
    }
  }
  const float alpha = G == Grad::kA ? 1.0f : ad.scale;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t p = p0 + tp + 16 * u;
    if (p >= P) continue;
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int64_t q = q0 + tq + 16 * v;
      if (q < Q) grad[p * Q + q] += alpha * acc[u][v];
    }
  }
}

template <Grad G>
cudaError_t LaunchWeightGrad(cudaStream_t stream, DType dtype, const GradArgs& args) {
  if (args.segs.num_adapters == 0 || args.segs.max_rank == 0) return cudaSuccess;
  const int64_t P = G == Grad::kA ? args.segs.max_rank : args.w.out;
  const int64_t Q = G == Grad::kA ? args.w.in : args.segs.max_rank;
  const dim3 grid(static_cast<unsigned>(args.segs.num_adapters),
                  static_cast<unsigned>(CeilDiv(P, kGP)), static_cast<unsigned>(CeilDiv(Q, kGQ)));
  return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    LoraWeightGradKernel<T, G><<<grid, kThreads, 0, stream>>>(args);
    return cudaGetLastError();
  });
}

template <typename T>
__global__ void LoraDropoutKernel(T* y, int64_t ldy, const T* x, int64_t ldx, int64_t rows,
                                  int64_t cols, uint64_t seed, float p, bool accumulate) {
  const int64_t total = rows * cols;
  for (int64_t i = GlobalThreadIndex(); i < total; i += GlobalThreadCount()) {
    const int64_t n = i / cols, c = i % cols;
    const float v = ToFloat(x[n * ldx + c]) * DropoutScale(seed, n, c, p);
    T* dst = y + n * ldy + c;
    *dst = FromFloat<T>(accumulate ? ToFloat(*dst) + v : v);
  }
}

}  // namespace

int LoraTokenSplits(int64_t tiles, int64_t max_rank, int64_t kdim, int sm_count) {
  // About 8 blocks per SM, each walking at least 4 steps of kBK.
  const int64_t blocks = std::max<int64_t>(1, tiles * CeilDiv(std::max<int64_t>(max_rank, 1), int64_t{kBN}));
  const int64_t want = CeilDiv(int64_t{8} * std::max(sm_count, 1), blocks);
  const int64_t most = kdim / (4 * kBK);
  return static_cast<int>(std::clamp<int64_t>(std::min(want, most), 1, 32));
}

bool LoraUsesGather(const SegmentsView& segs) { return UseGather(segs); }

cudaError_t LoraShrink(cudaStream_t stream, DType dtype, void* h, const void* x, int64_t ldx,
                       const SegmentsView& segs, const WeightsView& w, uint64_t seed, int splits,
                       float* workspace) {
  if (UseGather(segs)) {
    return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
      return LaunchGatherShrink<typename decltype(tag)::type>(stream, h, x, ldx, segs, w, seed);
    });
  }
  TokenArgs args{h, 0, x, ldx, segs, w, seed};
  args.partial = workspace;
  return DispatchToken<Mode::kShrink>(stream, dtype, args, splits);
}

cudaError_t LoraShrinkExpand(cudaStream_t stream, DType dtype, void* y, int64_t ldy, const void* x,
                             int64_t ldx, const SegmentsView& segs, const WeightsView& w,
                             int splits, float* workspace, void* h) {
  // Summing the slices in the expand pays off for few tiles (decode); with many (prefill) every
  // column block of the expand would re-sum them, so the separate sum pass is cheaper there.
  constexpr int32_t kMaxTilesToFuse = 32;
  if (UseGather(segs) || splits <= 1 || workspace == nullptr || segs.num_tiles > kMaxTilesToFuse) {
    cudaError_t err = LoraShrink(stream, dtype, h, x, ldx, segs, w, 0, splits, workspace);
    if (err != cudaSuccess) return err;
    return LoraExpand(stream, dtype, y, ldy, h, segs, w);
  }
  if (segs.num_tiles == 0 || segs.max_rank <= 0) return cudaSuccess;
  return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    // The shrink's slices, exactly as LaunchToken<kShrink> makes them, without its sum pass.
    TokenArgs sa{nullptr, 0, x, ldx, segs, w, 0};
    sa.partial = workspace;
    sa.kslice = CeilDiv(CeilDiv(w.in, static_cast<int64_t>(splits)), int64_t{kBK}) * kBK;
    const int used = static_cast<int>(CeilDiv(w.in, sa.kslice));
    const dim3 sgrid(static_cast<unsigned>(segs.num_tiles),
                     static_cast<unsigned>(CeilDiv(segs.max_rank, kBN)), static_cast<unsigned>(used));
    LoraTokenKernel<T, Mode::kShrink><<<sgrid, kThreads, 0, stream>>>(sa);
    TokenArgs ea{y, ldy, nullptr, 0, segs, w, 0};
    ea.partial_in = workspace;
    ea.in_splits = used;
    return LaunchToken<T, Mode::kExpand>(stream, ea);
  });
}

cudaError_t LoraExpand(cudaStream_t stream, DType dtype, void* y, int64_t ldy, const void* h,
                       const SegmentsView& segs, const WeightsView& w) {
  if (UseGather(segs)) {
    return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
      return LaunchGatherExpand<typename decltype(tag)::type>(stream, y, ldy, h, segs, w);
    });
  }
  return DispatchToken<Mode::kExpand>(stream, dtype, TokenArgs{y, ldy, h, 0, segs, w, 0});
}

cudaError_t LoraExpandBackward(cudaStream_t stream, DType dtype, void* dh, const WeightsView* grads,
                               const void* dy, int64_t lddy, const void* h,
                               const SegmentsView& segs, const WeightsView& w, int splits,
                               float* workspace) {
  TokenArgs args{dh, 0, dy, lddy, segs, w, 0};
  args.partial = workspace;
  cudaError_t err = DispatchToken<Mode::kExpandGrad>(stream, dtype, args, splits);
  if (err != cudaSuccess || grads == nullptr) return err;
  return LaunchWeightGrad<Grad::kB>(stream, dtype, GradArgs{dy, lddy, h, 0, segs, w, *grads, 0});
}

cudaError_t LoraShrinkBackward(cudaStream_t stream, DType dtype, void* dx, int64_t lddx,
                               const WeightsView* grads, const void* dh, const void* x, int64_t ldx,
                               const SegmentsView& segs, const WeightsView& w, uint64_t seed) {
  if (dx != nullptr) {
    const cudaError_t err =
        DispatchToken<Mode::kShrinkGrad>(stream, dtype, TokenArgs{dx, lddx, dh, 0, segs, w, seed});
    if (err != cudaSuccess) return err;
  }
  if (grads == nullptr) return cudaSuccess;
  return LaunchWeightGrad<Grad::kA>(stream, dtype, GradArgs{dh, 0, x, ldx, segs, w, *grads, seed});
}

cudaError_t LoraDropout(cudaStream_t stream, DType dtype, void* y, int64_t ldy, const void* x,
                        int64_t ldx, int64_t rows, int64_t cols, uint64_t seed, float p,
                        bool accumulate) {
  return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    const int threads = 256;
    LoraDropoutKernel<T><<<GridFor(rows * cols, threads), threads, 0, stream>>>(
        static_cast<T*>(y), ldy, static_cast<const T*>(x), ldx, rows, cols, seed, p, accumulate);
    return cudaGetLastError();
  });
}

}  // namespace tandem::ops::cuda
