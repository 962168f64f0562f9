// ops::PagedKvWrite / PagedAttention: validation and dispatch (ops/paged_attention.h).
#include "ops/paged_attention.h"

#include <cmath>

#include "ops/internal/op_util.h"
#include "ops/internal/paged_attention_kernels.h"
#include "ops/ops.h"
#include "ops/profiler.h"

namespace tandem::ops {
namespace {

using internal::Dim;
using internal::Layout;

// kv [P, page_elems] row stride free, in a dtype the device computes attention in.
bool CheckPages(internal::OpChecker& chk, const Context& ctx, const Tensor& kv, int64_t kv_heads,
                int64_t head_dim, int64_t block_tokens) {
  if (!chk.Ranked(kv, "kv", 2)) return false;
  chk.Expect(kv, "kv", {{"P", kv.dim(0)}, {"page_elems", kv.dim(1)}}, internal::FloatDTypes(ctx),
             Layout::RowStrideFree());
  chk.Require(block_tokens > 0 && kv_heads > 0, "block_tokens and kv_heads must be positive, ",
              "found ", block_tokens, " and ", kv_heads);
  chk.Require(kv.dim(1) >= 2 * block_tokens * kv_heads * head_dim, "tensor 'kv': a page of ",
              kv.dim(1), " elements cannot hold K and V of ", block_tokens, " positions x ",
              kv_heads, " heads x D=", head_dim);
  return chk.ok();
}

PagedShape MakeShape(const Tensor& kv, int64_t tokens, int64_t q_heads, int64_t kv_heads,
                     int64_t head_dim, int64_t block_tokens, int64_t max_blocks, int64_t q_stride,
                     int64_t o_stride) {
  return {tokens,     q_heads,  kv_heads, head_dim, block_tokens, internal::LeadingStride(kv, 0),
          max_blocks, q_stride, o_stride};
}

}  // namespace

Status PagedKvWrite(Context& ctx, Tensor& kv, const Tensor& k, const Tensor& v, const Tensor& slot,
                    int64_t block_tokens) {
  ProfileScope profile(ctx, "paged_attention");
  internal::OpChecker chk("PagedKvWrite", ctx);
  if (!chk.Ranked(k, "k", 3)) return chk.status();
  const Dim n{"N", k.dim(0)}, hkv{"Hkv", k.dim(1)}, d{"D", k.dim(2)};
  if (!CheckPages(chk, ctx, kv, hkv.size, d.size, block_tokens)) return chk.status();
  chk.Expect(k, "k", {n, hkv, d}, {kv.dtype()}, Layout::TokenStrideFree());
  chk.Expect(v, "v", {n, hkv, d}, {kv.dtype()}, Layout::TokenStrideFree());
  chk.Expect(slot, "slot", {n}, {DType::kI32}, Layout::Contiguous());
  if (!chk.ok()) return chk.status();
  if (n.size == 0) return Status::Ok();
  const PagedShape s = MakeShape(kv, n.size, 0, hkv.size, d.size, block_tokens, 0,
                                 internal::LeadingStride(k, 0), internal::LeadingStride(v, 0));
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const cudaError_t err =
        cuda::PagedKvWrite(internal::StreamOf(ctx), kv.dtype(), s, kv.raw_data(), k.raw_data(),
                           v.raw_data(), slot.data<int32_t>());
    return internal::CudaResult(err, "PagedKvWrite", ctx, [&] { return StrCat("N=", n.size); });
  }
#endif
  const int32_t* sl = slot.data<int32_t>();
  for (int64_t i = 0; i < n.size; ++i) {
    if (sl[i] < 0 || sl[i] >= kv.dim(0) * block_tokens) {
      return InvalidArgumentError(StrCat("PagedKvWrite: slot[", i, "] = ", sl[i], " outside [0, ",
                                         kv.dim(0) * block_tokens, ")"));
    }
  }
  cpu::PagedKvWrite(s, kv.data<float>(), k.data<float>(), v.data<float>(), sl);
  return Status::Ok();
}

Status RopePagedKvWrite(Context& ctx, Tensor& qk, Tensor& kv, const Tensor& v,
                        const Tensor& positions, const Tensor& inv_freq, const Tensor& slot,
                        int64_t kv_heads, int64_t block_tokens) {
  internal::OpChecker chk("RopePagedKvWrite", ctx);
  if (!chk.Ranked(qk, "qk", 3)) return chk.status();
  const Dim n{"N", qk.dim(0)}, h{"Hq+Hkv", qk.dim(1)}, d{"D", qk.dim(2)};
  chk.Require(kv_heads > 0 && kv_heads < h.size, "kv_heads must be in [1, ", h.size - 1,
              "] (qk holds q heads, then k heads), found ", kv_heads);
  chk.Require(d.size % 2 == 0, "tensor 'qk': head dim D must be even, found shape ",
              ShapeToString(qk.shape()));
  if (!chk.ok() || !CheckPages(chk, ctx, kv, kv_heads, d.size, block_tokens)) return chk.status();
  const Dim hkv{"Hkv", kv_heads};
  chk.Expect(qk, "qk", {n, h, d}, {kv.dtype()}, Layout::TokenStrideFree());
  chk.Expect(v, "v", {n, hkv, d}, {kv.dtype()}, Layout::TokenStrideFree());
  chk.Expect(positions, "positions", {n}, {DType::kI32}, Layout::Contiguous());
  chk.Expect(inv_freq, "inv_freq", {{"D/2", d.size / 2}}, {DType::kF32}, Layout::Contiguous());
  chk.Expect(slot, "slot", {n}, {DType::kI32}, Layout::Contiguous());
  if (!chk.ok()) return chk.status();
  if (n.size == 0) return Status::Ok();
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    ProfileScope profile(ctx, "paged_attention");
    const PagedShape s = MakeShape(kv, n.size, h.size - kv_heads, kv_heads, d.size, block_tokens, 0,
                                   internal::LeadingStride(qk, 0), internal::LeadingStride(v, 0));
    const cudaError_t err = cuda::RopePagedKvWrite(
        internal::StreamOf(ctx), kv.dtype(), s, kv.raw_data(), qk.raw_data(), v.raw_data(),
        positions.data<int32_t>(), inv_freq.data<float>(), slot.data<int32_t>());
    return internal::CudaResult(err, "RopePagedKvWrite", ctx,
                                [&] { return internal::Describe("qk", qk); });
  }
#endif
  // The reference: the two ops it fuses.
  TANDEM_RETURN_IF_ERROR(Rope(ctx, qk, qk, positions, inv_freq, false));
  const Tensor k = qk.Slice(1, h.size - kv_heads, h.size);
  return PagedKvWrite(ctx, kv, k, v, slot, block_tokens);
}

Status PagedAttention(Context& ctx, Tensor& out, const Tensor& q, const Tensor& kv,
                      const Tensor& block_table, const Tensor& req, const Tensor& pos,
                      int64_t kv_heads, int64_t block_tokens, float scale) {
  ProfileScope profile(ctx, "paged_attention");
  internal::OpChecker chk("PagedAttention", ctx);
  if (!chk.Ranked(q, "q", 3) || !chk.Ranked(block_table, "block_table", 2)) return chk.status();
  const Dim n{"N", q.dim(0)}, hq{"Hq", q.dim(1)}, d{"D", q.dim(2)};
  if (!CheckPages(chk, ctx, kv, kv_heads, d.size, block_tokens)) return chk.status();
  chk.Expect(q, "q", {n, hq, d}, {kv.dtype()}, Layout::TokenStrideFree());
  chk.Expect(out, "out", {n, hq, d}, {kv.dtype()}, Layout::TokenStrideFree());
  chk.Expect(block_table, "block_table",
             {{"R", block_table.dim(0)}, {"max_blocks", block_table.dim(1)}}, {DType::kI32},
             Layout::Contiguous());
  chk.Expect(req, "req", {n}, {DType::kI32}, Layout::Contiguous());
  chk.Expect(pos, "pos", {n}, {DType::kI32}, Layout::Contiguous());
  chk.Require(hq.size % kv_heads == 0, "query heads Hq=", hq.size,
              " must be a multiple of kv heads Hkv=", kv_heads);
  chk.Require(!ctx.is_cuda() || (d.size % 32 == 0 && d.size <= 256),
              "tensor 'q': the CUDA kernel takes D a multiple of 32 up to 256, found ", d.size);
  chk.Require(std::isfinite(scale), "scale must be finite, found ", scale);
  if (!chk.ok()) return chk.status();
  if (n.size == 0) return Status::Ok();
  const PagedShape s =
      MakeShape(kv, n.size, hq.size, kv_heads, d.size, block_tokens, block_table.dim(1),
                internal::LeadingStride(q, 0), internal::LeadingStride(out, 0));
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const cudaError_t err = cuda::PagedAttention(
        internal::StreamOf(ctx), kv.dtype(), s, out.raw_data(), q.raw_data(), kv.raw_data(),
        block_table.data<int32_t>(), req.data<int32_t>(), pos.data<int32_t>(), scale);
    return internal::CudaResult(err, "PagedAttention", ctx,
                                [&] { return StrCat("N=", n.size, ", Hq=", hq.size); });
  }
#endif
  const int32_t* r = req.data<int32_t>();
  const int32_t* p = pos.data<int32_t>();
  const int32_t* bt = block_table.data<int32_t>();
  for (int64_t i = 0; i < n.size; ++i) {
    if (r[i] < 0 || r[i] >= block_table.dim(0) || p[i] < 0 ||
        p[i] / block_tokens >= block_table.dim(1)) {
      return InvalidArgumentError(StrCat("PagedAttention: token ", i, " has req ", r[i], ", pos ",
                                         p[i], " outside the block table ",
                                         block_table.DebugString()));
    }
    for (int64_t j = 0; j <= p[i] / block_tokens; ++j) {
      const int32_t page = bt[r[i] * block_table.dim(1) + j];
      if (page < 0 || page >= kv.dim(0)) {
        return InvalidArgumentError(StrCat("PagedAttention: block_table[", r[i], ", ", j,
                                           "] = ", page, " outside [0, ", kv.dim(0), ")"));
      }
    }
  }
  cpu::PagedAttention(s, out.data<float>(), q.data<float>(), kv.data<float>(), bt, r, p, scale);
  return Status::Ok();
}

}  // namespace tandem::ops
