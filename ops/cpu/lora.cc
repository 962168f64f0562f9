// The f32 reference of the segmented LoRA ops (ops/lora.h): plain loops over segments, tokens and
// ranks, every dot product and token sum accumulated in f64 in increasing index order and rounded
// once. OpenMP splits only independent tokens (activation outputs) or gradient rows (weight
// gradients), so results do not depend on the thread count.
#include <cstdint>
#include <vector>

#include "ops/internal/lora_kernels.h"

namespace tandem::ops::cpu {
namespace {

using lora::AdapterRecord;
using lora::DropoutScale;
using lora::SegmentRecord;
using lora::SegmentsView;
using lora::WeightsView;

constexpr int64_t kParallelMinWork = 1 << 15;

float* AsFloats(void* p) { return static_cast<float*>(p); }

// Calls f(segment record, adapter record) for every segment with an adapter.
template <typename F>
void ForEachActiveSegment(const SegmentsView& segs, const WeightsView& w, F&& f) {
  for (int32_t s = 0; s < segs.num_segments; ++s) {
    const SegmentRecord& seg = segs.segments[s];
    if (seg.adapter < 0 || seg.end == seg.start) continue;
    f(seg, w.adapters[seg.adapter]);
  }
}

}  // namespace

void LoraShrink(float* h, const float* x, int64_t ldx, const SegmentsView& segs,
                const WeightsView& w, uint64_t seed) {
  const int64_t in = w.in;
  ForEachActiveSegment(segs, w, [&](const SegmentRecord& seg, const AdapterRecord& ad) {
    const float* A = AsFloats(ad.a);  // [r, in]
    const int64_t r = seg.rank, len = seg.end - seg.start;
#pragma omp parallel for schedule(static) if (len * r * in > kParallelMinWork)
    for (int64_t t = 0; t < len; ++t) {
      const int64_t n = seg.start + t;
      std::vector<float> xd(in);  // drop(x_n)
      for (int64_t c = 0; c < in; ++c)
        xd[c] = x[n * ldx + c] * DropoutScale(seed, n, c, ad.dropout);
      float* out = h + seg.h_offset + t * r;
      for (int64_t j = 0; j < r; ++j) {
        double acc = 0.0;
        for (int64_t c = 0; c < in; ++c) acc += static_cast<double>(xd[c]) * A[j * in + c];
        out[j] = static_cast<float>(acc);
      }
    }
  });
}

void LoraExpand(float* y, int64_t ldy, const float* h, const SegmentsView& segs,
                const WeightsView& w) {
  const int64_t out = w.out;
  ForEachActiveSegment(segs, w, [&](const SegmentRecord& seg, const AdapterRecord& ad) {
    const float* B = AsFloats(ad.b);  // [out, r]
    const int64_t r = seg.rank, len = seg.end - seg.start;
#pragma omp parallel for schedule(static) if (len * r * out > kParallelMinWork)
    for (int64_t t = 0; t < len; ++t) {
      const float* hn = h + seg.h_offset + t * r;
      float* yn = y + (seg.start + t) * ldy;
      for (int64_t o = 0; o < out; ++o) {
        double acc = 0.0;
        for (int64_t j = 0; j < r; ++j) acc += static_cast<double>(hn[j]) * B[o * r + j];
        yn[o] += ad.scale * static_cast<float>(acc);
      }
    }
  });
}

void LoraExpandBackward(float* dh, const WeightsView* grads, const float* dy, int64_t lddy,
                        const float* h, const SegmentsView& segs, const WeightsView& w) {
  const int64_t out = w.out;
  // dh = s * dy B.
  ForEachActiveSegment(segs, w, [&](const SegmentRecord& seg, const AdapterRecord& ad) {
    const float* B = AsFloats(ad.b);
    const int64_t r = seg.rank, len = seg.end - seg.start;
#pragma omp parallel for schedule(static) if (len * r * out > kParallelMinWork)
    for (int64_t t = 0; t < len; ++t) {
      const float* dyn = dy + (seg.start + t) * lddy;
      for (int64_t j = 0; j < r; ++j) {
        double acc = 0.0;
        for (int64_t o = 0; o < out; ++o) acc += static_cast<double>(dyn[o]) * B[o * r + j];
        dh[seg.h_offset + t * r + j] = ad.scale * static_cast<float>(acc);
      }
    }
  });
  if (grads == nullptr) return;
  // dB_a[o, j] += s * sum over the adapter's tokens of dy[n, o] h[n, j].
  for (int32_t a = 0; a < segs.num_adapters; ++a) {
    float* dB = AsFloats(grads->adapters[a].b);
    const int64_t r = w.adapters[a].rank;
    if (dB == nullptr || r == 0) continue;
    const int32_t b0 = segs.adapter_seg_begin[a], b1 = segs.adapter_seg_begin[a + 1];
    const float scale = w.adapters[a].scale;
#pragma omp parallel for schedule(static) if (out * r * segs.num_tokens > kParallelMinWork)
    for (int64_t o = 0; o < out; ++o) {
      std::vector<double> acc(r, 0.0);
      for (int32_t i = b0; i < b1; ++i) {
        const SegmentRecord& seg = segs.segments[segs.adapter_segs[i]];
        for (int64_t t = 0; t < seg.end - seg.start; ++t) {
          const double g = dy[(seg.start + t) * lddy + o];
          const float* hn = h + seg.h_offset + t * r;
          for (int64_t j = 0; j < r; ++j) acc[j] += g * hn[j];
        }
      }
      for (int64_t j = 0; j < r; ++j) dB[o * r + j] += scale * static_cast<float>(acc[j]);
    }
  }
}

void LoraShrinkBackward(float* dx, int64_t lddx, const WeightsView* grads, const float* dh,
                        const float* x, int64_t ldx, const SegmentsView& segs, const WeightsView& w,
                        uint64_t seed) {
  const int64_t in = w.in;
  // dx += drop(dh A).
  if (dx != nullptr) {
    ForEachActiveSegment(segs, w, [&](const SegmentRecord& seg, const AdapterRecord& ad) {
      const float* A = AsFloats(ad.a);
      const int64_t r = seg.rank, len = seg.end - seg.start;
#pragma omp parallel for schedule(static) if (len * r * in > kParallelMinWork)
      for (int64_t t = 0; t < len; ++t) {
        const int64_t n = seg.start + t;
        const float* dhn = dh + seg.h_offset + t * r;
        for (int64_t c = 0; c < in; ++c) {
          double acc = 0.0;
          for (int64_t j = 0; j < r; ++j) acc += static_cast<double>(dhn[j]) * A[j * in + c];
          dx[n * lddx + c] += DropoutScale(seed, n, c, ad.dropout) * static_cast<float>(acc);
        }
      }
    });
  }
  if (grads == nullptr) return;
  // dA_a[j, c] += sum over the adapter's tokens of dh[n, j] drop(x)[n, c].
  for (int32_t a = 0; a < segs.num_adapters; ++a) {
    float* dA = AsFloats(grads->adapters[a].a);
    const int64_t r = w.adapters[a].rank;
    if (dA == nullptr || r == 0) continue;
    const int32_t b0 = segs.adapter_seg_begin[a], b1 = segs.adapter_seg_begin[a + 1];
    const float p = w.adapters[a].dropout;
#pragma omp parallel for schedule(static) if (in * r * segs.num_tokens > kParallelMinWork)
    for (int64_t j = 0; j < r; ++j) {
      std::vector<double> acc(in, 0.0);
      for (int32_t i = b0; i < b1; ++i) {
        const SegmentRecord& seg = segs.segments[segs.adapter_segs[i]];
        for (int64_t t = 0; t < seg.end - seg.start; ++t) {
          const int64_t n = seg.start + t;
          const double g = dh[seg.h_offset + t * r + j];
          for (int64_t c = 0; c < in; ++c) {
            acc[c] += g * static_cast<double>(x[n * ldx + c] * DropoutScale(seed, n, c, p));
          }
        }
      }
      for (int64_t c = 0; c < in; ++c) dA[j * in + c] += static_cast<float>(acc[c]);
    }
  }
}

void LoraDropout(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, int64_t cols,
                 uint64_t seed, float p, bool accumulate) {
#pragma omp parallel for schedule(static) if (rows * cols > kParallelMinWork)
  for (int64_t n = 0; n < rows; ++n) {
    for (int64_t c = 0; c < cols; ++c) {
      const float v = x[n * ldx + c] * DropoutScale(seed, n, c, p);
      y[n * ldy + c] = accumulate ? y[n * ldy + c] + v : v;
    }
  }
}

}  // namespace tandem::ops::cpu
