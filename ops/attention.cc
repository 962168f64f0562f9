// ops::AttentionForward / AttentionBackward and their block variants (AttentionBlockForward /
// AttentionBlockBackward, a mask mode instead of segment ids): validation and dispatch.
#include <atomic>
#include <cmath>

#include "ops/cpu/kernels.h"
#include "ops/internal/op_util.h"
#include "ops/ops.h"
#include "ops/profiler.h"

namespace tandem::ops {
namespace {

std::atomic<AttentionKernel> g_attention_kernel{AttentionKernel::kAuto};

using internal::Dim;
using internal::Layout;

// The dims every attention tensor is checked against.
struct AttnDims {
  Dim b, t, hq, hkv, d;
};

// Checks q, k, v (and segment_ids, scale) and reads the dims off q and k.
bool CheckInputs(internal::OpChecker& chk, const Context& ctx, const Tensor& q, const Tensor& k,
                 const Tensor& v, const Tensor& segment_ids, float scale, AttnDims* dims) {
  if (!chk.Ranked(q, "q", 4) || !chk.Ranked(k, "k", 4)) return false;
  const AttnDims a{
      {"B", q.dim(0)}, {"T", q.dim(1)}, {"Hq", q.dim(2)}, {"Hkv", k.dim(2)}, {"D", q.dim(3)}};
  *dims = a;
  const internal::DTypeSet dtypes =
      ctx.is_cuda() ? internal::DTypeSet{DType::kBF16} : internal::DTypeSet{DType::kF32};
  const Layout tokens = Layout::TokenStrideFree();
  chk.Expect(q, "q", {a.b, a.t, a.hq, a.d}, dtypes, tokens);
  chk.Expect(k, "k", {a.b, a.t, a.hkv, a.d}, {q.dtype()}, tokens);
  chk.Expect(v, "v", {a.b, a.t, a.hkv, a.d}, {q.dtype()}, tokens);
  chk.Require(a.hkv.size > 0 && a.hq.size % a.hkv.size == 0, "query heads Hq=", a.hq.size,
              " must be a multiple of kv heads Hkv=", a.hkv.size);
  chk.Require(!ctx.is_cuda() || a.d.size == 64 || a.d.size == 128,
              "tensor 'q': the CUDA kernel takes head dim D 64 or 128, found ", a.d.size);
  chk.Require(std::isfinite(scale), "scale must be finite, found ", scale);
  if (segment_ids.defined()) {
    chk.Expect(segment_ids, "segment_ids", {a.b, a.t}, {DType::kI32}, Layout::Contiguous());
  }
  return chk.ok();
}

// Token strides of the four operands; a gradient must match its input's stride (the kernels take
// one stride per pair, for views into fused qkv / dqkv buffers).
cpu::AttentionShape ShapeOf(const AttnDims& a, const Tensor& q, const Tensor& k, const Tensor& v,
                            const Tensor& o) {
  return {a.b.size,
          a.t.size,
          a.hq.size,
          a.hkv.size,
          a.d.size,
          internal::LeadingStride(q, 1),
          internal::LeadingStride(k, 1),
          internal::LeadingStride(v, 1),
          internal::LeadingStride(o, 1)};
}

bool RequireSameStride(internal::OpChecker& chk, const Tensor& g, const char* g_name,
                       const Tensor& x, const char* x_name) {
  return chk.Require(internal::LeadingStride(g, 1) == internal::LeadingStride(x, 1), "tensor '",
                     g_name, "': token stride ", internal::LeadingStride(g, 1), " must equal '",
                     x_name, "' token stride ", internal::LeadingStride(x, 1));
}

#ifdef TANDEM_WITH_CUDA
cuda::AttentionShape ToCuda(const cpu::AttentionShape& s) {
  cuda::AttentionShape c{s.batch,    s.seq,      s.q_heads,  s.kv_heads, s.head_dim,
                         s.q_stride, s.k_stride, s.v_stride, s.o_stride};
  c.causal = s.causal;
  const AttentionKernel kernel = GetAttentionKernel();
  c.allow_sm90 = kernel != AttentionKernel::kMmaSync;
  c.fused_dq = kernel == AttentionKernel::kAuto;
  return c;
}
std::string DescribeShape(const cpu::AttentionShape& s) {
  return StrCat("B=", s.batch, ", T=", s.seq, ", Hq=", s.q_heads, ", Hkv=", s.kv_heads,
                ", D=", s.head_dim);
}
#endif

// Floating-point operations of one attention call for the profiler (ops/profiler.h): 4 * D per
// visible (query, key) pair and query head in the forward (q.k and p.v), 2.5 times that in the
// backward (s recomputed, dv, dp, dq, dk). 0 with segment ids (the visible pairs are not known
// without reading them) or when q is not [B, T, Hq, D] (validation will say so).
double AttentionFlops(const Tensor& q, bool causal, bool has_segments, bool backward) {
  if (has_segments || !q.defined() || q.ndim() != 4) return 0.0;
  const double t = static_cast<double>(q.dim(1));
  const double pairs = causal ? t * (t + 1) / 2 : t * t;
  const double fwd = 4.0 * static_cast<double>(q.dim(0) * q.dim(2) * q.dim(3)) * pairs;
  return backward ? 2.5 * fwd : fwd;
}

Status ForwardImpl(const char* op, Context& ctx, Tensor& out, Tensor& lse, const Tensor& q,
                   const Tensor& k, const Tensor& v, float scale, const Tensor& segment_ids,
                   bool causal) {
  internal::OpChecker chk(op, ctx);
  AttnDims a;
  if (!CheckInputs(chk, ctx, q, k, v, segment_ids, scale, &a)) return chk.status();
  chk.Expect(out, "out", {a.b, a.t, a.hq, a.d}, {q.dtype()}, Layout::TokenStrideFree());
  chk.Expect(lse, "lse", {a.b, a.hq, a.t}, {DType::kF32}, Layout::Contiguous());
  if (!chk.ok()) return chk.status();
  if (q.numel() == 0) return Status::Ok();
  cpu::AttentionShape s = ShapeOf(a, q, k, v, out);
  s.causal = causal;
  const int32_t* seg = segment_ids.defined() ? segment_ids.data<int32_t>() : nullptr;
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const cudaError_t err = cuda::AttentionForward(internal::StreamOf(ctx), ToCuda(s),
                                                   out.raw_data(), lse.data<float>(), q.raw_data(),
                                                   k.raw_data(), v.raw_data(), scale, seg);
    return internal::CudaResult(err, op, ctx, [&] { return DescribeShape(s); });
  }
#endif
  cpu::AttentionForward(s, out.data<float>(), lse.data<float>(), q.data<float>(), k.data<float>(),
                        v.data<float>(), scale, seg);
  return Status::Ok();
}

Status BackwardImpl(const char* op, Context& ctx, Tensor& dq, Tensor& dk, Tensor& dv,
                    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                    const Tensor& out, const Tensor& lse, float scale, const Tensor& segment_ids,
                    bool causal) {
  internal::OpChecker chk(op, ctx);
  AttnDims a;
  if (!CheckInputs(chk, ctx, q, k, v, segment_ids, scale, &a)) return chk.status();
  const Layout tokens = Layout::TokenStrideFree();
  chk.Expect(out, "out", {a.b, a.t, a.hq, a.d}, {q.dtype()}, tokens);
  chk.Expect(dout, "dout", {a.b, a.t, a.hq, a.d}, {q.dtype()}, tokens);
  chk.Expect(lse, "lse", {a.b, a.hq, a.t}, {DType::kF32}, Layout::Contiguous());
  chk.Expect(dq, "dq", {a.b, a.t, a.hq, a.d}, {q.dtype()}, tokens);
  chk.Expect(dk, "dk", {a.b, a.t, a.hkv, a.d}, {q.dtype()}, tokens);
  chk.Expect(dv, "dv", {a.b, a.t, a.hkv, a.d}, {q.dtype()}, tokens);
  if (!chk.ok()) return chk.status();
  RequireSameStride(chk, dout, "dout", out, "out");
  RequireSameStride(chk, dq, "dq", q, "q");
  RequireSameStride(chk, dk, "dk", k, "k");
  RequireSameStride(chk, dv, "dv", v, "v");
  if (!chk.ok()) return chk.status();
  if (q.numel() == 0) return Status::Ok();
  cpu::AttentionShape s = ShapeOf(a, q, k, v, out);
  s.causal = causal;
  const int32_t* seg = segment_ids.defined() ? segment_ids.data<int32_t>() : nullptr;
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const cuda::AttentionShape cs = ToCuda(s);
    const size_t bytes = cuda::AttentionBackwardScratchBytes(cs);
    StatusOr<Tensor> scratch = internal::AllocateScratch(ctx, bytes);
    if (!scratch.ok()) return scratch.status().WithContext(StrCat(op, " scratch"));
    const cudaError_t err = cuda::AttentionBackward(
        internal::StreamOf(ctx), cs, dq.raw_data(), dk.raw_data(), dv.raw_data(), dout.raw_data(),
        q.raw_data(), k.raw_data(), v.raw_data(), out.raw_data(), lse.data<float>(), scale, seg,
        scratch->raw_data(), bytes);
    return internal::CudaResult(err, op, ctx, [&] { return DescribeShape(s); });
  }
#endif
  cpu::AttentionBackward(s, dq.data<float>(), dk.data<float>(), dv.data<float>(),
                         dout.data<float>(), q.data<float>(), k.data<float>(), v.data<float>(),
                         out.data<float>(), lse.data<float>(), scale, seg);
  return Status::Ok();
}

}  // namespace

void SetAttentionKernel(AttentionKernel kernel) { g_attention_kernel.store(kernel); }
AttentionKernel GetAttentionKernel() { return g_attention_kernel.load(); }

Status AttentionForward(Context& ctx, Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                        const Tensor& v, float scale, const Tensor& segment_ids) {
  ProfileScope profile(ctx, "attention_fwd");
  if (profile.active()) profile.AddFlops(AttentionFlops(q, true, segment_ids.defined(), false));
  return ForwardImpl("AttentionForward", ctx, out, lse, q, k, v, scale, segment_ids, true);
}

Status AttentionBackward(Context& ctx, Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout,
                         const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                         const Tensor& lse, float scale, const Tensor& segment_ids) {
  ProfileScope profile(ctx, "attention_bwd");
  if (profile.active()) profile.AddFlops(AttentionFlops(q, true, segment_ids.defined(), true));
  return BackwardImpl("AttentionBackward", ctx, dq, dk, dv, dout, q, k, v, out, lse, scale,
                      segment_ids, true);
}

Status AttentionBlockForward(Context& ctx, Tensor& out, Tensor& lse, const Tensor& q,
                             const Tensor& k, const Tensor& v, float scale, AttentionMask mask) {
  ProfileScope profile(ctx, "attention_fwd");
  if (profile.active()) {
    profile.AddFlops(AttentionFlops(q, mask == AttentionMask::kCausal, false, false));
  }
  return ForwardImpl("AttentionBlockForward", ctx, out, lse, q, k, v, scale, Tensor(),
                     mask == AttentionMask::kCausal);
}

Status AttentionBlockBackward(Context& ctx, Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout,
                              const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                              const Tensor& lse, float scale, AttentionMask mask) {
  ProfileScope profile(ctx, "attention_bwd");
  if (profile.active()) {
    profile.AddFlops(AttentionFlops(q, mask == AttentionMask::kCausal, false, true));
  }
  return BackwardImpl("AttentionBlockBackward", ctx, dq, dk, dv, dout, q, k, v, out, lse, scale,
                      Tensor(), mask == AttentionMask::kCausal);
}

}  // namespace tandem::ops
