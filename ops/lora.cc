// ops/lora.h: LoraSegments and LoraWeights (host records, one upload), validation and dispatch.
#include "ops/lora.h"

#include <algorithm>
#include <cstring>

#include "ops/internal/cuda_resources.h"
#include "ops/internal/lora_kernels.h"
#include "ops/internal/op_util.h"
#include "ops/profiler.h"

namespace tandem::ops {
namespace {

using internal::Dim;
using internal::Layout;

int64_t AlignUp8(int64_t n) { return (n + 7) / 8 * 8; }

// A host byte buffer and, on a CUDA context, its device copy (the host bytes stay alive with the
// owner, so the asynchronous copy may still be reading them after we return).
Status UploadRecords(Context& ctx, const Tensor& host, Tensor* device) {
  if (!ctx.is_cuda()) {
    *device = host;
    return Status::Ok();
  }
  TANDEM_ASSIGN_OR_RETURN(*device, Tensor::Empty(host.shape(), DType::kU8, ctx.allocator()));
  return CopyTensor(*device, host, ctx.stream());
}

lora::SegmentsLayout LayoutFor(int64_t segments, int64_t tiles, int64_t adapters,
                               int64_t adapter_segs) {
  lora::SegmentsLayout l;
  l.segments = 0;
  l.tiles = AlignUp8(l.segments + segments * int64_t{sizeof(lora::SegmentRecord)});
  l.adapter_seg_begin = AlignUp8(l.tiles + tiles * int64_t{sizeof(lora::TileRecord)});
  l.adapter_segs = AlignUp8(l.adapter_seg_begin + (adapters + 1) * 4);
  l.total_bytes = AlignUp8(l.adapter_segs + adapter_segs * 4);
  return l;
}

Status CheckSegmentInput(const std::vector<int32_t>& seg_start,
                         const std::vector<int32_t>& seg_adapter,
                         const std::vector<int32_t>& ranks) {
  const char* kWhere = "LoraSegments::Create";
  if (seg_start.size() != seg_adapter.size() + 1) {
    return InvalidArgumentError(StrCat(
        kWhere, ": expected seg_start to have seg_adapter.size() + 1 = ", seg_adapter.size() + 1,
        " entries, found ", seg_start.size()));
  }
  if (seg_start[0] != 0) {
    return InvalidArgumentError(
        StrCat(kWhere, ": expected seg_start[0] == 0, found ", seg_start[0]));
  }
  for (size_t s = 0; s < seg_adapter.size(); ++s) {
    if (seg_start[s + 1] < seg_start[s]) {
      return InvalidArgumentError(
          StrCat(kWhere, ": seg_start must be nondecreasing, found seg_start[", s,
                 "] = ", seg_start[s], " > seg_start[", s + 1, "] = ", seg_start[s + 1]));
    }
    if (seg_adapter[s] < -1 || seg_adapter[s] >= static_cast<int64_t>(ranks.size())) {
      return InvalidArgumentError(StrCat(kWhere, ": seg_adapter[", s, "] = ", seg_adapter[s],
                                         " is outside [-1, ", ranks.size(), ")"));
    }
  }
  for (size_t a = 0; a < ranks.size(); ++a) {
    if (ranks[a] < 0) {
      return InvalidArgumentError(StrCat(kWhere, ": ranks[", a, "] = ", ranks[a], " is negative"));
    }
  }
  return Status::Ok();
}

lora::SegmentsView ViewOf(const LoraSegments& segs, bool device) {
  const Tensor& buf = device ? segs.device_records() : segs.host_records();
  const auto* base = static_cast<const uint8_t*>(buf.raw_data());
  const int64_t tiles = segs.num_tiles();
  const lora::SegmentsLayout l =
      LayoutFor(segs.num_segments(), tiles, segs.num_adapters(), segs.num_active_segments());
  lora::SegmentsView v;
  v.num_tokens = segs.num_tokens();
  v.num_segments = static_cast<int32_t>(segs.num_segments());
  v.num_adapters = static_cast<int32_t>(segs.num_adapters());
  v.num_tiles = static_cast<int32_t>(tiles);
  v.max_rank = segs.max_rank();
  v.max_tile_rows = segs.max_tile_rows();
  v.h_numel = segs.h_numel();
  v.segments = reinterpret_cast<const lora::SegmentRecord*>(base + l.segments);
  v.tiles = reinterpret_cast<const lora::TileRecord*>(base + l.tiles);
  v.adapter_seg_begin = reinterpret_cast<const int32_t*>(base + l.adapter_seg_begin);
  v.adapter_segs = reinterpret_cast<const int32_t*>(base + l.adapter_segs);
  return v;
}

lora::WeightsView ViewOf(const LoraWeights& w, bool device) {
  const Tensor& buf = device ? w.device_records() : w.host_records();
  lora::WeightsView v;
  v.in = w.in();
  v.out = w.out();
  v.num_adapters = static_cast<int32_t>(w.num_adapters());
  v.adapters = static_cast<const lora::AdapterRecord*>(buf.raw_data());
  return v;
}

// The checks every segmented op shares: metadata on ctx's device, adapter counts and ranks agree.
bool CheckTables(internal::OpChecker& chk, Context& ctx, const LoraWeights& w,
                 const LoraSegments& segs, const char* weights_name) {
  if (!chk.Require(segs.device() == ctx.device() && w.device() == ctx.device(),
                   "LoraSegments and LoraWeights must be built on ", ctx.device().ToString(),
                   ", found ", segs.device().ToString(), " and ", w.device().ToString()) ||
      !chk.Require(w.num_adapters() == segs.num_adapters(), weights_name, ": expected ",
                   segs.num_adapters(), " adapters (as the LoraSegments), found ",
                   w.num_adapters())) {
    return false;
  }
  for (int64_t a = 0; a < w.num_adapters(); ++a) {
    if (!chk.Require(w.rank(a) == segs.ranks()[a], weights_name, ": adapter ", a, " has rank ",
                     w.rank(a), " but the LoraSegments were built with rank ", segs.ranks()[a])) {
      return false;
    }
  }
  return true;
}

bool CheckGrads(internal::OpChecker& chk, const LoraWeights* grads, const LoraWeights& w,
                const LoraSegments& segs) {
  if (grads == nullptr) return chk.ok();
  if (!chk.Require(grads->in() == w.in() && grads->out() == w.out(), "grads: expected in=", w.in(),
                   ", out=", w.out(), ", found in=", grads->in(), ", out=", grads->out()) ||
      !chk.Require(grads->num_adapters() == segs.num_adapters(), "grads: expected ",
                   segs.num_adapters(), " adapters, found ", grads->num_adapters())) {
    return false;
  }
  for (int64_t a = 0; a < grads->num_adapters(); ++a) {
    if (grads->rank(a) == 0) continue;  // an undefined entry skips that adapter's gradient
    if (!chk.Require(grads->rank(a) == segs.ranks()[a], "grads: adapter ", a, " has rank ",
                     grads->rank(a), ", expected ", segs.ranks()[a]) ||
        !chk.Require(grads->dtype() == DType::kF32, "grads: expected f32 gradients, found ",
                     DTypeName(grads->dtype()))) {
      return false;
    }
  }
  return chk.ok();
}

// x-like [N, cols] activations (row stride free) and h-like [h_numel] buffers of one dtype.
Status ValidateCall(Context& ctx, const char* op, const LoraWeights& w, const LoraSegments& segs,
                    const LoraWeights* grads,
                    std::initializer_list<std::pair<const char*, const Tensor*>> rows_in,
                    std::initializer_list<std::pair<const char*, const Tensor*>> rows_out,
                    std::initializer_list<std::pair<const char*, const Tensor*>> packed) {
  internal::OpChecker chk(op, ctx);
  if (!CheckTables(chk, ctx, w, segs, "weights") || !CheckGrads(chk, grads, w, segs)) {
    return chk.status();
  }
  const Dim n{"N", segs.num_tokens()}, in{"in", w.in()}, out{"out", w.out()};
  const Dim hn{"h_numel", segs.h_numel()};
  DType dtype = DType::kF32;
  bool have_dtype = false;
  auto check_dtype = [&](const char* name, const Tensor& t) {
    if (!have_dtype) {
      dtype = t.dtype();
      have_dtype = true;
      chk.Require(internal::FloatDTypes(ctx).Contains(dtype), "tensor '", name,
                  "': expected dtype ", internal::FloatDTypes(ctx).ToString(), ", found ",
                  DTypeName(dtype));
    }
    chk.Require(t.dtype() == dtype, "tensor '", name, "': expected dtype ", DTypeName(dtype),
                ", found ", DTypeName(t.dtype()));
  };
  for (const auto& [name, t] : rows_in) {
    chk.Expect(*t, name, {n, in}, {t->defined() ? t->dtype() : DType::kF32},
               Layout::RowStrideFree());
    if (chk.ok()) check_dtype(name, *t);
  }
  for (const auto& [name, t] : rows_out) {
    if (!t->defined()) continue;  // an optional dx
    chk.Expect(*t, name, {n, out}, {t->dtype()}, Layout::RowStrideFree());
    if (chk.ok()) check_dtype(name, *t);
  }
  for (const auto& [name, t] : packed) {
    chk.Expect(*t, name, {hn}, {t->defined() ? t->dtype() : DType::kF32}, Layout::Contiguous());
    if (chk.ok()) check_dtype(name, *t);
  }
  bool any_weight = false;
  for (int64_t a = 0; a < w.num_adapters(); ++a) any_weight = any_weight || w.rank(a) > 0;
  if (chk.ok() && any_weight) {
    chk.Require(w.dtype() == dtype, "weights: expected dtype ", DTypeName(dtype),
                " (the activations'), found ", DTypeName(w.dtype()));
  }
  return chk.status();
}

#ifdef TANDEM_WITH_CUDA
// The split-K of a long-reduction token kernel (see cuda::LoraTokenSplits) and its f32
// workspace, from the context's allocator (freed in stream order when it goes out of scope).
struct SplitWorkspace {
  int splits = 1;
  Tensor buffer;
  float* data() const { return buffer.defined() ? static_cast<float*>(buffer.raw_data()) : nullptr; }
};

// forward: the shrink of LoraShrink / LoraDelta, which needs no slices on thin batches (gather).
StatusOr<SplitWorkspace> SplitFor(Context& ctx, const LoraSegments& segs, int64_t kdim,
                                  bool forward) {
  SplitWorkspace w;
  if (forward && cuda::LoraUsesGather(ViewOf(segs, true))) return w;
  w.splits = cuda::LoraTokenSplits(segs.num_tiles(), segs.max_rank(), kdim, ctx.cuda()->sm_count);
  if (w.splits > 1) {
    TANDEM_ASSIGN_OR_RETURN(w.buffer, internal::AllocateScratch(
                                          ctx, static_cast<size_t>(w.splits) *
                                                   static_cast<size_t>(segs.h_numel()) * 4));
  }
  return w;
}

Status LoraCudaResult(cudaError_t err, const char* op, Context& ctx, const LoraSegments& segs,
                      const LoraWeights& w) {
  return internal::CudaResult(err, op, ctx, [&] {
    return StrCat("N=", segs.num_tokens(), ", segments=", segs.num_segments(),
                  ", adapters=", segs.num_adapters(), ", in=", w.in(), ", out=", w.out());
  });
}
#endif

}  // namespace

StatusOr<LoraSegments> LoraSegments::Create(Context& ctx, const std::vector<int32_t>& seg_start,
                                            const std::vector<int32_t>& seg_adapter,
                                            const std::vector<int32_t>& ranks) {
  ProfileScope profile(ctx, "lora");
  TANDEM_RETURN_IF_ERROR(CheckSegmentInput(seg_start, seg_adapter, ranks));
  LoraSegments out;
  out.seg_start_ = seg_start;
  out.seg_adapter_ = seg_adapter;
  out.ranks_ = ranks;
  out.device_ = ctx.device();
  for (int32_t r : ranks) out.max_rank_ = std::max(out.max_rank_, r);
  const int64_t S = static_cast<int64_t>(seg_adapter.size());
  const int64_t A = static_cast<int64_t>(ranks.size());
  std::vector<lora::SegmentRecord> segs(S);
  std::vector<lora::TileRecord> tiles;
  std::vector<std::vector<int32_t>> by_adapter(A);
  out.h_offset_.resize(S);
  int64_t offset = 0;
  for (int64_t s = 0; s < S; ++s) {
    lora::SegmentRecord& r = segs[s];
    r.start = seg_start[s];
    r.end = seg_start[s + 1];
    const int32_t a = seg_adapter[s];
    r.adapter = (a >= 0 && ranks[a] > 0) ? a : -1;
    r.rank = r.adapter >= 0 ? ranks[a] : 0;
    r.h_offset = offset;
    out.h_offset_[s] = offset;
    offset += static_cast<int64_t>(r.end - r.start) * r.rank;
    if (r.adapter < 0) continue;
    by_adapter[a].push_back(static_cast<int32_t>(s));
    for (int32_t row0 = 0; row0 < r.end - r.start; row0 += lora::kLoraTileRows) {
      tiles.push_back({static_cast<int32_t>(s), row0});
      out.max_tile_rows_ =
          std::max(out.max_tile_rows_, std::min(lora::kLoraTileRows, r.end - r.start - row0));
    }
  }
  out.h_numel_ = offset;
  out.num_tiles_ = static_cast<int64_t>(tiles.size());
  std::vector<int32_t> begin(A + 1, 0), flat;
  for (int64_t a = 0; a < A; ++a) {
    begin[a + 1] = begin[a] + static_cast<int32_t>(by_adapter[a].size());
    flat.insert(flat.end(), by_adapter[a].begin(), by_adapter[a].end());
  }
  out.num_active_segments_ = static_cast<int64_t>(flat.size());
  const lora::SegmentsLayout l =
      LayoutFor(S, static_cast<int64_t>(tiles.size()), A, static_cast<int64_t>(flat.size()));
  out.host_records_ = Tensor::CpuZeros({std::max<int64_t>(l.total_bytes, 8)}, DType::kU8);
  uint8_t* base = out.host_records_.data<uint8_t>();
  std::memcpy(base + l.segments, segs.data(), segs.size() * sizeof(lora::SegmentRecord));
  std::memcpy(base + l.tiles, tiles.data(), tiles.size() * sizeof(lora::TileRecord));
  std::memcpy(base + l.adapter_seg_begin, begin.data(), begin.size() * 4);
  std::memcpy(base + l.adapter_segs, flat.data(), flat.size() * 4);
  TANDEM_RETURN_IF_ERROR(UploadRecords(ctx, out.host_records_, &out.records_));
  return out;
}

int32_t LoraWeights::rank(int64_t a) const {
  return entries_[a].a.defined() ? static_cast<int32_t>(entries_[a].a.dim(0)) : 0;
}

StatusOr<LoraWeights> LoraWeights::Create(Context& ctx, int64_t in, int64_t out,
                                          std::vector<Entry> entries) {
  LoraWeights w;
  w.in_ = in;
  w.out_ = out;
  w.device_ = ctx.device();
  bool have_dtype = false;
  std::vector<lora::AdapterRecord> records(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    const Entry& e = entries[i];
    const std::string where = StrCat("LoraWeights::Create: adapter ", i);
    if (e.a.defined() != e.b.defined()) {
      return InvalidArgumentError(
          StrCat(where, ": A and B must both be defined or both undefined"));
    }
    if (!(e.dropout >= 0.0f && e.dropout < 1.0f)) {
      return InvalidArgumentError(StrCat(where, ": dropout must be in [0, 1), found ", e.dropout));
    }
    records[i].scale = e.scale;
    records[i].dropout = e.dropout;
    if (!e.a.defined()) continue;
    if (e.a.ndim() != 2 || e.a.dim(0) <= 0 || e.a.dim(1) != in || !e.a.is_contiguous()) {
      return InvalidArgumentError(
          StrCat(where, ": expected A contiguous [r > 0, in=", in, "], found ", e.a.DebugString()));
    }
    const int64_t r = e.a.dim(0);
    if (e.b.shape() != Shape{out, r} || !e.b.is_contiguous()) {
      return InvalidArgumentError(StrCat(where, ": expected B contiguous [out=", out, ", r=", r,
                                         "], found ", e.b.DebugString()));
    }
    if (!have_dtype) w.dtype_ = e.a.dtype();
    have_dtype = true;
    for (const Tensor* t : {&e.a, &e.b}) {
      if (t->dtype() != w.dtype_ || t->device() != ctx.device()) {
        return InvalidArgumentError(StrCat(where, ": expected ", DTypeName(w.dtype_), " on ",
                                           ctx.device().ToString(), ", found ", t->DebugString()));
      }
    }
    records[i].a = e.a.raw_data();
    records[i].b = e.b.raw_data();
    records[i].rank = static_cast<int32_t>(r);
  }
  w.entries_ = std::move(entries);
  const int64_t bytes = static_cast<int64_t>(records.size() * sizeof(lora::AdapterRecord));
  w.host_records_ = Tensor::CpuZeros({std::max<int64_t>(bytes, 8)}, DType::kU8);
  std::memcpy(w.host_records_.raw_data(), records.data(), static_cast<size_t>(bytes));
  TANDEM_RETURN_IF_ERROR(UploadRecords(ctx, w.host_records_, &w.records_));
  return w;
}

Status LoraShrink(Context& ctx, Tensor& h, const Tensor& x, const LoraWeights& w,
                  const LoraSegments& segs, uint64_t dropout_seed) {
  ProfileScope profile(ctx, "lora");
  TANDEM_RETURN_IF_ERROR(
      ValidateCall(ctx, "LoraShrink", w, segs, nullptr, {{"x", &x}}, {}, {{"h", &h}}));
  if (segs.h_numel() == 0) return Status::Ok();
  const int64_t ldx = internal::LeadingStride(x, 0);
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    TANDEM_ASSIGN_OR_RETURN(const SplitWorkspace split, SplitFor(ctx, segs, w.in(), true));
    return LoraCudaResult(
        cuda::LoraShrink(internal::StreamOf(ctx), x.dtype(), h.raw_data(), x.raw_data(), ldx,
                         ViewOf(segs, true), ViewOf(w, true), dropout_seed, split.splits,
                         split.data()),
        "LoraShrink", ctx, segs, w);
  }
#endif
  cpu::LoraShrink(h.data<float>(), x.data<float>(), ldx, ViewOf(segs, false), ViewOf(w, false),
                  dropout_seed);
  return Status::Ok();
}

Status LoraExpand(Context& ctx, Tensor& y, const Tensor& h, const LoraWeights& w,
                  const LoraSegments& segs) {
  ProfileScope profile(ctx, "lora");
  TANDEM_RETURN_IF_ERROR(
      ValidateCall(ctx, "LoraExpand", w, segs, nullptr, {}, {{"y", &y}}, {{"h", &h}}));
  if (!y.defined()) return InvalidArgumentError("LoraExpand: tensor 'y' is undefined");
  if (segs.h_numel() == 0) return Status::Ok();
  const int64_t ldy = internal::LeadingStride(y, 0);
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    return LoraCudaResult(cuda::LoraExpand(internal::StreamOf(ctx), y.dtype(), y.raw_data(), ldy,
                                           h.raw_data(), ViewOf(segs, true), ViewOf(w, true)),
                          "LoraExpand", ctx, segs, w);
  }
#endif
  cpu::LoraExpand(y.data<float>(), ldy, h.data<float>(), ViewOf(segs, false), ViewOf(w, false));
  return Status::Ok();
}

Status LoraDelta(Context& ctx, Tensor& y, const Tensor& x, const LoraWeights& w,
                 const LoraSegments& segs) {
  ProfileScope profile(ctx, "lora");
  if (!y.defined()) return InvalidArgumentError("LoraDelta: tensor 'y' is undefined");
  TANDEM_RETURN_IF_ERROR(
      ValidateCall(ctx, "LoraDelta", w, segs, nullptr, {{"x", &x}}, {{"y", &y}}, {}));
  if (segs.h_numel() == 0) return Status::Ok();
  TANDEM_ASSIGN_OR_RETURN(Tensor h, Tensor::Empty({segs.h_numel()}, x.dtype(), ctx.allocator()));
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    TANDEM_ASSIGN_OR_RETURN(const SplitWorkspace split, SplitFor(ctx, segs, w.in(), true));
    return LoraCudaResult(
        cuda::LoraShrinkExpand(internal::StreamOf(ctx), x.dtype(), y.raw_data(),
                               internal::LeadingStride(y, 0), x.raw_data(),
                               internal::LeadingStride(x, 0), ViewOf(segs, true), ViewOf(w, true),
                               split.splits, split.data(), h.raw_data()),
        "LoraDelta", ctx, segs, w);
  }
#endif
  TANDEM_RETURN_IF_ERROR(LoraShrink(ctx, h, x, w, segs, 0));
  return LoraExpand(ctx, y, h, w, segs);
}

Status LoraExpandBackward(Context& ctx, Tensor& dh, const LoraWeights* grads, const Tensor& dy,
                          const Tensor& h, const LoraWeights& w, const LoraSegments& segs) {
  ProfileScope profile(ctx, "lora");
  TANDEM_RETURN_IF_ERROR(ValidateCall(ctx, "LoraExpandBackward", w, segs, grads, {}, {{"dy", &dy}},
                                      {{"dh", &dh}, {"h", &h}}));
  if (!dy.defined()) return InvalidArgumentError("LoraExpandBackward: tensor 'dy' is undefined");
  if (segs.h_numel() == 0) return Status::Ok();
  const int64_t lddy = internal::LeadingStride(dy, 0);
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const lora::WeightsView gv = grads != nullptr ? ViewOf(*grads, true) : lora::WeightsView{};
    TANDEM_ASSIGN_OR_RETURN(const SplitWorkspace split, SplitFor(ctx, segs, w.out(), false));
    return LoraCudaResult(
        cuda::LoraExpandBackward(internal::StreamOf(ctx), dy.dtype(), dh.raw_data(),
                                 grads != nullptr ? &gv : nullptr, dy.raw_data(), lddy,
                                 h.raw_data(), ViewOf(segs, true), ViewOf(w, true), split.splits,
                                 split.data()),
        "LoraExpandBackward", ctx, segs, w);
  }
#endif
  const lora::WeightsView gv = grads != nullptr ? ViewOf(*grads, false) : lora::WeightsView{};
  cpu::LoraExpandBackward(dh.data<float>(), grads != nullptr ? &gv : nullptr, dy.data<float>(),
                          lddy, h.data<float>(), ViewOf(segs, false), ViewOf(w, false));
  return Status::Ok();
}

Status LoraShrinkBackward(Context& ctx, Tensor& dx, const LoraWeights* grads, const Tensor& dh,
                          const Tensor& x, const LoraWeights& w, const LoraSegments& segs,
                          uint64_t dropout_seed) {
  ProfileScope profile(ctx, "lora");
  // dx is [N, in]: validate it as an input-shaped tensor when given.
  if (dx.defined()) {
    TANDEM_RETURN_IF_ERROR(ValidateCall(ctx, "LoraShrinkBackward", w, segs, grads,
                                        {{"x", &x}, {"dx", &dx}}, {}, {{"dh", &dh}}));
  } else {
    TANDEM_RETURN_IF_ERROR(
        ValidateCall(ctx, "LoraShrinkBackward", w, segs, grads, {{"x", &x}}, {}, {{"dh", &dh}}));
  }
  if (segs.h_numel() == 0) return Status::Ok();
  const int64_t ldx = internal::LeadingStride(x, 0);
  const int64_t lddx = dx.defined() ? internal::LeadingStride(dx, 0) : 0;
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const lora::WeightsView gv = grads != nullptr ? ViewOf(*grads, true) : lora::WeightsView{};
    return LoraCudaResult(
        cuda::LoraShrinkBackward(internal::StreamOf(ctx), x.dtype(),
                                 dx.defined() ? dx.raw_data() : nullptr, lddx,
                                 grads != nullptr ? &gv : nullptr, dh.raw_data(), x.raw_data(), ldx,
                                 ViewOf(segs, true), ViewOf(w, true), dropout_seed),
        "LoraShrinkBackward", ctx, segs, w);
  }
#endif
  const lora::WeightsView gv = grads != nullptr ? ViewOf(*grads, false) : lora::WeightsView{};
  cpu::LoraShrinkBackward(dx.defined() ? dx.data<float>() : nullptr, lddx,
                          grads != nullptr ? &gv : nullptr, dh.data<float>(), x.data<float>(), ldx,
                          ViewOf(segs, false), ViewOf(w, false), dropout_seed);
  return Status::Ok();
}

Status LoraDropout(Context& ctx, Tensor& y, const Tensor& x, uint64_t seed, float p,
                   bool accumulate) {
  ProfileScope profile(ctx, "lora");
  internal::OpChecker chk("LoraDropout", ctx);
  if (!chk.Ranked(x, "x", 2)) return chk.status();
  const Dim n{"N", x.dim(0)}, c{"C", x.dim(1)};
  chk.Expect(x, "x", {n, c}, internal::FloatDTypes(ctx), Layout::RowStrideFree());
  chk.Expect(y, "y", {n, c}, {x.dtype()}, Layout::RowStrideFree());
  chk.Require(p >= 0.0f && p < 1.0f, "p must be in [0, 1), found ", p);
  if (!chk.ok()) return chk.status();
  if (x.numel() == 0) return Status::Ok();
  const int64_t ldx = internal::LeadingStride(x, 0), ldy = internal::LeadingStride(y, 0);
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const cudaError_t err =
        cuda::LoraDropout(internal::StreamOf(ctx), x.dtype(), y.raw_data(), ldy, x.raw_data(), ldx,
                          x.dim(0), x.dim(1), seed, p, accumulate);
    return internal::CudaResult(err, "LoraDropout", ctx,
                                [&] { return internal::Describe("x", x); });
  }
#endif
  cpu::LoraDropout(y.data<float>(), ldy, x.data<float>(), ldx, x.dim(0), x.dim(1), seed, p,
                   accumulate);
  return Status::Ok();
}

}  // namespace tandem::ops
