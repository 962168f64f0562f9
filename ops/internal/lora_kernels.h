// The kernels behind ops/lora.h: the metadata records both backends read, the dropout mask, the
// CPU reference (ops/cpu/lora.cc) and the CUDA launchers (ops/cuda/lora.cu). Raw pointers,
// strides and a stream; no Tensor or Status: ops/lora.cc validated everything once.
//
// Records (POD, identical bytes on host and device). LoraSegments uploads one buffer holding
//   SegmentRecord[S] | TileRecord[num_tiles] | int32 adapter_seg_begin[A + 1] | int32 adapter_segs
// at the offsets of SegmentsLayout; LoraWeights uploads AdapterRecord[A]. A segment's `adapter`
// is -1 both for "no adapter" and for an adapter of rank 0 on this projection; tiles cover only
// segments with an adapter, kLoraTileRows tokens each; adapter_segs lists, per adapter, its
// segments in increasing order (CSR by adapter_seg_begin), which fixes the order of the weight
// gradient sums.
#pragma once

#include <cstdint>

#include "core/dtype.h"
#include "core/rng.h"

#ifdef TANDEM_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace tandem::ops::lora {

// Tokens per tile of the CUDA token kernels (one thread block per tile and column block).
inline constexpr int kLoraTileRows = 32;

struct SegmentRecord {
  int32_t start = 0;     // first token
  int32_t end = 0;       // one past the last token
  int32_t adapter = -1;  // -1: no adapter (or rank 0)
  int32_t rank = 0;      // r of the adapter on this projection (0 with adapter -1)
  int64_t h_offset = 0;  // first element of the segment's [len, rank] block of h
};

struct TileRecord {
  int32_t segment = 0;
  int32_t row0 = 0;  // first token of the tile, relative to the segment start
};

struct AdapterRecord {
  void* a = nullptr;  // A [r, in] (or dA), nullptr when absent
  void* b = nullptr;  // B [out, r] (or dB)
  int32_t rank = 0;
  float scale = 1.0f;
  float dropout = 0.0f;
  int32_t unused = 0;
};
static_assert(sizeof(SegmentRecord) == 24 && sizeof(TileRecord) == 8 && sizeof(AdapterRecord) == 32,
              "records are shared with the device byte for byte");

// Byte offsets of the arrays inside one LoraSegments record buffer.
struct SegmentsLayout {
  int64_t segments = 0, tiles = 0, adapter_seg_begin = 0, adapter_segs = 0, total_bytes = 0;
};

// What a kernel sees of a LoraSegments: pointers into its record buffer where the kernel runs.
struct SegmentsView {
  int64_t num_tokens = 0;
  int32_t num_segments = 0;
  int32_t num_adapters = 0;
  int32_t num_tiles = 0;
  int32_t max_rank = 0;
  int32_t max_tile_rows = 0;                   // tokens in the fullest tile (<= kLoraTileRows)
  int64_t h_numel = 0;                         // elements of the packed h
  const SegmentRecord* segments = nullptr;     // [S]
  const TileRecord* tiles = nullptr;           // [num_tiles]
  const int32_t* adapter_seg_begin = nullptr;  // [A + 1]
  const int32_t* adapter_segs = nullptr;       // segments of adapter a: [begin[a], begin[a + 1])
};

// What a kernel sees of a LoraWeights.
struct WeightsView {
  int64_t in = 0;
  int64_t out = 0;
  int32_t num_adapters = 0;
  const AdapterRecord* adapters = nullptr;  // [A]
};

// The dropout multiplier m(row, col) of ops/lora.h: 0 or 1 / (1 - p); exactly 1 when p <= 0.
TANDEM_HOST_DEVICE inline float DropoutScale(uint64_t seed, int64_t row, int64_t col, float p) {
  if (p <= 0.0f) return 1.0f;
  const Philox4x32Result r =
      Philox4x32(seed, static_cast<uint64_t>(row), static_cast<uint64_t>(col) >> 2);
  const float u = static_cast<float>(r[static_cast<int>(col & 3)] >> 8) * (1.0f / 16777216.0f);
  return u >= p ? 1.0f / (1.0f - p) : 0.0f;
}

}  // namespace tandem::ops::lora

// The f32 reference: plain loops, sums in f64 in a fixed order, OpenMP over independent rows.
namespace tandem::ops::cpu {

void LoraShrink(float* h, const float* x, int64_t ldx, const lora::SegmentsView& segs,
                const lora::WeightsView& w, uint64_t seed);
void LoraExpand(float* y, int64_t ldy, const float* h, const lora::SegmentsView& segs,
                const lora::WeightsView& w);
// grads nullable.
void LoraExpandBackward(float* dh, const lora::WeightsView* grads, const float* dy, int64_t lddy,
                        const float* h, const lora::SegmentsView& segs, const lora::WeightsView& w);
// dx and grads nullable.
void LoraShrinkBackward(float* dx, int64_t lddx, const lora::WeightsView* grads, const float* dh,
                        const float* x, int64_t ldx, const lora::SegmentsView& segs,
                        const lora::WeightsView& w, uint64_t seed);
void LoraDropout(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, int64_t cols,
                 uint64_t seed, float p, bool accumulate);
// row_ids nullable (row i); see ops::LoraDropoutAt.
void LoraDropoutAt(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, int64_t cols,
                   const int64_t* row_ids, int64_t col_offset, uint64_t seed, float p,
                   bool accumulate);

}  // namespace tandem::ops::cpu

#ifdef TANDEM_WITH_CUDA
// CUDA launchers: dtype kF32 or kBF16 for activations and weights; gradients f32. Each enqueues on
// `stream` and returns cudaGetLastError().
namespace tandem::ops::cuda {

// Split-K of the token kernels with a long reduction (shrink: K = in; the expand gradient:
// K = out) whose outputs are few (N x r): with few tiles (decode) one block per tile would walk
// all of K alone. They run `splits` K slices in parallel into an f32 workspace of
// splits x h_numel (the caller allocates it) and a second kernel sums the slices in a fixed
// order into h: deterministic. LoraTokenSplits picks the count (1: no workspace needed).
int LoraTokenSplits(int64_t tiles, int64_t max_rank, int64_t kdim, int sm_count);
// Whether the forward (LoraShrink, LoraExpand, LoraShrinkExpand) of this batch runs the gather
// kernels of thin batches (few tokens: decode), which need no split-K workspace.
bool LoraUsesGather(const lora::SegmentsView& segs);

// workspace: f32 [splits, segs.h_numel] when splits > 1 (else unused, may be null).
cudaError_t LoraShrink(cudaStream_t stream, DType dtype, void* h, const void* x, int64_t ldx,
                       const lora::SegmentsView& segs, const lora::WeightsView& w, uint64_t seed,
                       int splits = 1, float* workspace = nullptr);
cudaError_t LoraExpand(cudaStream_t stream, DType dtype, void* y, int64_t ldy, const void* h,
                       const lora::SegmentsView& segs, const lora::WeightsView& w);
// LoraShrink then LoraExpand (ops::LoraDelta). splits > 1: the shrink's slices go to `workspace`
// (f32 [splits, h_numel]) and the expand sums them as it loads h (rounded to dtype); else h goes
// through `h` ([h_numel] of dtype).
cudaError_t LoraShrinkExpand(cudaStream_t stream, DType dtype, void* y, int64_t ldy, const void* x,
                             int64_t ldx, const lora::SegmentsView& segs,
                             const lora::WeightsView& w, int splits, float* workspace, void* h);
cudaError_t LoraExpandBackward(cudaStream_t stream, DType dtype, void* dh,
                               const lora::WeightsView* grads, const void* dy, int64_t lddy,
                               const void* h, const lora::SegmentsView& segs,
                               const lora::WeightsView& w, int splits = 1,
                               float* workspace = nullptr);
cudaError_t LoraShrinkBackward(cudaStream_t stream, DType dtype, void* dx, int64_t lddx,
                               const lora::WeightsView* grads, const void* dh, const void* x,
                               int64_t ldx, const lora::SegmentsView& segs,
                               const lora::WeightsView& w, uint64_t seed);
cudaError_t LoraDropout(cudaStream_t stream, DType dtype, void* y, int64_t ldy, const void* x,
                        int64_t ldx, int64_t rows, int64_t cols, uint64_t seed, float p,
                        bool accumulate);
cudaError_t LoraDropoutAt(cudaStream_t stream, DType dtype, void* y, int64_t ldy, const void* x,
                          int64_t ldx, int64_t rows, int64_t cols, const int64_t* row_ids,
                          int64_t col_offset, uint64_t seed, float p, bool accumulate);

}  // namespace tandem::ops::cuda
#endif
