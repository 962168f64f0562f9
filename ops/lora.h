// Segmented multi-adapter LoRA ops (Punica / S-LoRA "shrink" and "expand"), CPU and CUDA.
//
// One linear projection y = x W^T (W [out, in]) serves a batch of N tokens (rows) that is cut
// into segments [seg_start[s], seg_start[s + 1]), each using one adapter seg_adapter[s] (or -1:
// no adapter). On this projection adapter a has rank r_a >= 0 (0: the adapter does not touch the
// projection; its tokens pass through), weights A_a [r_a, in] and B_a [out, r_a], a scale s_a and
// a dropout probability p_a. For every token n of a segment whose adapter a has r_a > 0:
//
//   LoraShrink:          h_n  = drop_a(x_n) A_a^T                  h_n [r_a]
//   LoraExpand:          y_n += s_a * h_n B_a^T                    y_n [out]
//   LoraExpandBackward:  dh_n = s_a * dy_n B_a;      dB_a += s_a * sum_n dy_n^T h_n
//   LoraShrinkBackward:  dx_n += drop_a(dh_n A_a);   dA_a += sum_n dh_n^T drop_a(x_n)
//
// (the weight-gradient sums run over all tokens of all segments of adapter a). Tokens of other
// segments are left untouched (y, dx) and take no space in h.
//
// Ranks differ per adapter and nothing is padded to a maximum rank. The low-rank activations h
// (and dh) are "segment-packed": segment s with adapter a holds a row-major [len_s, r_a] block at
// element LoraSegments::h_offset(s) = sum over earlier segments s' of len_s' * r_(a(s')), so the
// whole buffer has LoraSegments::h_numel() elements. A batch whose only segment is adapter a has
// h = [N, r_a] row-major: the same layout a plain GEMM produces.
//
// Dropout (on the adapter input only, as HF PEFT): drop_a(v)[n, c] = v[n, c] * m(n, c) with
//   m(n, c) = (u >= p_a) ? 1 / (1 - p_a) : 0,  u = (word >> 8) * 2^-24,
//   word = Philox4x32(key = dropout_seed, counter_hi = n, counter_lo = c / 4)[c % 4]
// (core/rng.h), n the row of x in the whole batch and c the column. The mask is regenerated from
// (seed, n, c) wherever it is needed (shrink, its backward, LoraDropout), so nothing is stored.
// p_a == 0 gives m == 1 exactly. 1 / (1 - p) is an f32 division on host and device alike.
//
// Metadata: LoraSegments (the segments and the rank of every adapter on one projection) and
// LoraWeights (one projection's per-adapter A, B, scale and dropout: a table of device addresses)
// are built once on the host, uploaded once, and reused by every call that shares them (all layers
// of a batch use one LoraSegments per distinct rank table). They keep the tensors they point at
// alive (tensor handles), but their address tables go stale if a caller re-allocates those tensors:
// rebuild them then.
//
// dtypes and layout: x, y, h, dh, dx, dy and the weights share one dtype (f32 on a CPU context,
// f32 or bf16 on CUDA, accumulation in f32); weight gradients are f32 and accumulate (+=). x, y,
// dx and dy are [N, cols] with row stride free (views into a fused qkv or gate|up output work);
// h and dh are contiguous [h_numel]. Deterministic: each output element is summed in a fixed
// order by one thread (CUDA) or one loop (CPU); no float atomics.
//
// Thread-safety: LoraSegments and LoraWeights are immutable after Create; ops follow ops/ops.h.
#pragma once

#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "ops/context.h"

namespace tandem::ops {

// The segments of one batch and the adapters' ranks on one projection, on the host and uploaded
// to a context's device.
class LoraSegments {
 public:
  LoraSegments() = default;

  // seg_start: S + 1 offsets, seg_start[0] == 0, nondecreasing (empty segments are allowed);
  // seg_adapter: S entries in [-1, ranks.size()); ranks: one entry >= 0 per adapter.
  // InvalidArgument naming the bad entry otherwise.
  static StatusOr<LoraSegments> Create(Context& ctx, const std::vector<int32_t>& seg_start,
                                       const std::vector<int32_t>& seg_adapter,
                                       const std::vector<int32_t>& ranks);

  int64_t num_tokens() const { return seg_start_.empty() ? 0 : seg_start_.back(); }
  int64_t num_segments() const { return static_cast<int64_t>(seg_adapter_.size()); }
  int64_t num_adapters() const { return static_cast<int64_t>(ranks_.size()); }
  const std::vector<int32_t>& seg_start() const { return seg_start_; }
  const std::vector<int32_t>& seg_adapter() const { return seg_adapter_; }
  const std::vector<int32_t>& ranks() const { return ranks_; }
  int32_t max_rank() const { return max_rank_; }
  // Elements of the packed h buffer, and where segment s's [len, r] block starts.
  int64_t h_numel() const { return h_numel_; }
  int64_t h_offset(int64_t s) const { return h_offset_[s]; }
  Device device() const { return device_; }

  // For the op implementations: CUDA tiles and segments with an adapter, and the uploaded records
  // (layout in ops/internal/lora_kernels.h).
  int64_t num_tiles() const { return num_tiles_; }
  int32_t max_tile_rows() const { return max_tile_rows_; }  // tokens in the fullest tile
  int64_t num_active_segments() const { return num_active_segments_; }
  const Tensor& device_records() const { return records_; }
  const Tensor& host_records() const { return host_records_; }

 private:
  std::vector<int32_t> seg_start_, seg_adapter_, ranks_;
  std::vector<int64_t> h_offset_;
  int32_t max_rank_ = 0;
  int32_t max_tile_rows_ = 0;
  int64_t h_numel_ = 0;
  int64_t num_tiles_ = 0, num_active_segments_ = 0;
  Device device_;
  Tensor host_records_;  // u8, the record arrays on the host
  Tensor records_;       // u8, the same bytes on the device (== host_records_ on a CPU context)
};

// One projection's low-rank weights (or their gradients) for every adapter of a LoraSegments.
class LoraWeights {
 public:
  struct Entry {
    Tensor a;              // [r, in], contiguous; undefined when the adapter has rank 0 here
    Tensor b;              // [out, r], contiguous; undefined with a
    float scale = 1.0f;    // s_a (alpha / r, or alpha / sqrt(r) with rsLoRA)
    float dropout = 0.0f;  // p_a in [0, 1)
  };

  LoraWeights() = default;

  // All defined entries share one dtype and ctx's device; a and b are both defined or both
  // undefined, with matching rank. InvalidArgument naming the entry otherwise.
  static StatusOr<LoraWeights> Create(Context& ctx, int64_t in, int64_t out,
                                      std::vector<Entry> entries);

  int64_t in() const { return in_; }
  int64_t out() const { return out_; }
  int64_t num_adapters() const { return static_cast<int64_t>(entries_.size()); }
  const Entry& entry(int64_t a) const { return entries_[a]; }
  // Rank of adapter a (0 when undefined).
  int32_t rank(int64_t a) const;
  // The dtype of the defined entries (f32 when none is defined).
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }

  const Tensor& device_records() const { return records_; }
  const Tensor& host_records() const { return host_records_; }

 private:
  int64_t in_ = 0, out_ = 0;
  std::vector<Entry> entries_;
  DType dtype_ = DType::kF32;
  Device device_;
  Tensor host_records_;
  Tensor records_;
};

// h = drop(x) A^T per segment (see the header). x [N, in] (row stride free); h [h_numel]
// contiguous, overwritten; N == segs.num_tokens(); w.rank(a) == segs.ranks()[a] for every a.
Status LoraShrink(Context& ctx, Tensor& h, const Tensor& x, const LoraWeights& w,
                  const LoraSegments& segs, uint64_t dropout_seed);

// y += s * h B^T per segment. y [N, out] (row stride free); h [h_numel].
Status LoraExpand(Context& ctx, Tensor& y, const Tensor& h, const LoraWeights& w,
                  const LoraSegments& segs);

// y += s * drop(x) A^T B^T per segment with dropout_seed 0: LoraShrink then LoraExpand without
// handing h back (inference: the serving forward's one call per LoRA site). On CUDA, when the
// shrink is split over K (few tokens), the expand sums the slices as it reads them instead of a
// separate pass; results equal LoraShrink + LoraExpand bit for bit (h is rounded to the compute
// dtype the same way).
Status LoraDelta(Context& ctx, Tensor& y, const Tensor& x, const LoraWeights& w,
                 const LoraSegments& segs);

// dh = s * dy B (overwritten, [h_numel]); if grads is given, grads.b_a += s * dy^T h over the
// adapter's tokens for every adapter whose grads entry is defined (f32 [out, r_a]).
// dy [N, out] (row stride free), h from the forward.
Status LoraExpandBackward(Context& ctx, Tensor& dh, const LoraWeights* grads, const Tensor& dy,
                          const Tensor& h, const LoraWeights& w, const LoraSegments& segs);

// dx += drop(dh A) for the tokens of adapter segments (dx [N, in], row stride free; undefined to
// skip); if grads is given, grads.a_a += dh^T drop(x) (f32 [r_a, in]). x is the forward input and
// dropout_seed the forward's seed.
Status LoraShrinkBackward(Context& ctx, Tensor& dx, const LoraWeights* grads, const Tensor& dh,
                          const Tensor& x, const LoraWeights& w, const LoraSegments& segs,
                          uint64_t dropout_seed);

// y = drop(x) (or y += drop(x) when accumulate) with the mask of the header for probability p in
// [0, 1), rows counted from x's first row. x, y [N, C] (row stride free), one dtype. For callers
// that run a one-adapter batch through plain GEMMs (ops::Matmul) and need the same mask.
Status LoraDropout(Context& ctx, Tensor& y, const Tensor& x, uint64_t seed, float p,
                   bool accumulate);

// LoraDropout with the mask of other rows and columns: row i of x takes the mask of row
// row_ids[i] (i64 [N], contiguous, on ctx's device; undefined: row i) and column c the mask of
// column col_offset + c. For a rank that holds some tokens and input columns of a larger batch
// (data, context and tensor parallelism), so that its mask equals that of the whole batch.
Status LoraDropoutAt(Context& ctx, Tensor& y, const Tensor& x, uint64_t seed, float p,
                     bool accumulate, const Tensor& row_ids, int64_t col_offset);

}  // namespace tandem::ops
