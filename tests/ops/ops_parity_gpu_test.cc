// CUDA vs CPU parity of every op (ggml test-backend-ops style): one table of cases {op, sizes,
// dtype}; each case runs once on a CPU context and once on a CUDA context, and every element of
// every output is compared. Plus a CUDA determinism check (two runs, identical bytes).
//
// Inputs: uniform random values from fixed seeds, rounded to the case dtype. The CPU run gets
// those values in f32 (the CPU path is f32); the CUDA run gets them in the case dtype (bf16, or
// f32 where the CUDA path takes f32: every op but attention). Ops whose CPU path takes every dtype
// (Cast, Add, Scale, Fill, SumSquares, AdamW's model_weights) get the same dtype on both sides.
// Outputs the op must overwrite start as NaN, so a skipped element fails.
//
// Tolerances, per output: |cuda - cpu| <= abs * max|cpu| + rel * |cpu|, the abs part scaled by
// the output's largest magnitude so one rule holds for reductions over any K or T:
//   bf16 outputs of reductions (GEMM, norms, attention, ...): abs 2e-2, rel 2e-2 (bf16 keeps 8
//     bits, ~4e-3 per rounding; flash attention also rounds P and dS to bf16 inside).
//   bf16 outputs of elementwise math (RoPE, SwiGLU): abs 2e-4, rel 1e-2 (one rounding).
//   f32 outputs accumulated from the same bf16-exact inputs (rstd, lse, losses, dw, dtable, GEMM
//     with f32 c): abs 2e-4, rel 2e-4 (only the summation order differs).
//   f32 cases: abs 1e-4, rel 1e-4 (elementwise 1e-5); exact copies and casts: 0.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "tests/ops/op_test_util.h"

namespace tandem::ops {
namespace {

struct Tol {
  double abs_of_max;
  double rel;
};
constexpr Tol kBf16Reduce{2e-2, 2e-2};
constexpr Tol kBf16Elementwise{2e-4, 1e-2};
constexpr Tol kF32Accumulated{2e-4, 2e-4};
constexpr Tol kF32Reduce{1e-4, 1e-4};
constexpr Tol kF32Elementwise{1e-5, 1e-5};
constexpr Tol kExact{0, 0};

Tol Reduce(DType dt) { return dt == DType::kBF16 ? kBf16Reduce : kF32Reduce; }
Tol Elementwise(DType dt) { return dt == DType::kBF16 ? kBf16Elementwise : kF32Elementwise; }

struct Output {
  std::string name;
  Tensor host;  // f32, contiguous
  Tol tol;
};
using Outputs = std::vector<Output>;

// Places case inputs on one context and fetches outputs back. Every op status goes through Run().
class Runner {
 public:
  explicit Runner(Context& ctx) : ctx_(ctx) {}
  Context& ctx() { return ctx_; }
  bool ok() const { return ok_; }

  void Run(const Status& s, const char* what) {
    if (s.ok()) return;
    ok_ = false;
    ADD_FAILURE() << what << " on " << ctx_.device().ToString() << ": " << s.ToString();
  }
  // Values rounded to `dtype`; stored as `dtype` on CUDA and as f32 on CPU (the CPU path).
  Tensor Random(const Shape& shape, uint64_t seed, DType dtype, float lo = -1, float hi = 1) {
    return Place(Rounded(RandomUniformHost(shape, seed, lo, hi), dtype),
                 ctx_.is_cuda() ? dtype : DType::kF32);
  }
  // Values rounded to `dtype` and stored as `dtype` on both sides.
  Tensor RandomAs(const Shape& shape, uint64_t seed, DType dtype, float lo = -1, float hi = 1) {
    return Place(Rounded(RandomUniformHost(shape, seed, lo, hi), dtype), dtype);
  }
  Tensor Nan(const Shape& shape, DType dtype) {
    Tensor host = Tensor::Cpu(shape, DType::kF32);
    std::fill_n(host.data<float>(), host.numel(), std::numeric_limits<float>::quiet_NaN());
    return Place(host, ctx_.is_cuda() ? dtype : DType::kF32);
  }
  // A host tensor (ids, positions, frequencies) copied as is.
  Tensor Put(const Tensor& host) { return Place(host, host.dtype()); }
  // Filled with NaN and stored as `dtype` on both sides.
  Tensor NanAs(const Shape& shape, DType dtype) {
    Tensor host = Tensor::Cpu(shape, DType::kF32);
    std::fill_n(host.data<float>(), host.numel(), std::numeric_limits<float>::quiet_NaN());
    return Place(host, dtype);
  }
  // Host f32 copy of a contiguous tensor (floating or i32), after the stream has drained.
  Tensor Fetch(const Tensor& t) {
    Run(ctx_.Synchronize(), "Synchronize");
    Tensor host = *CopyToHostBlocking(t);
    if (host.dtype() == DType::kF32) return host;
    if (IsFloating(host.dtype())) return *CastCpu(host, DType::kF32);
    TANDEM_CHECK(host.dtype() == DType::kI32);
    Tensor out = Tensor::Cpu(host.shape(), DType::kF32);
    for (int64_t i = 0; i < host.numel(); ++i) out.data<float>()[i] = host.data<int32_t>()[i];
    return out;
  }

 private:
  static Tensor RandomUniformHost(const Shape& shape, uint64_t seed, float lo, float hi) {
    return ::tandem::testing::RandomUniform(shape, seed, lo, hi);
  }
  static Tensor Rounded(Tensor t, DType dtype) {
    if (dtype == DType::kBF16) {
      for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = RoundToBf16(t.data<float>()[i]);
    } else if (dtype == DType::kF16) {
      for (int64_t i = 0; i < t.numel(); ++i) {
        t.data<float>()[i] = F16ToFloat(FloatToF16(t.data<float>()[i]));
      }
    }
    return t;
  }
  // `host` (f32 or i32) converted to `dtype` and copied onto the context.
  Tensor Place(const Tensor& host, DType dtype) {
    Tensor typed = host.dtype() == dtype ? host : *CastCpu(host, dtype);
    return *CopyToDeviceBlocking(typed, ctx_.allocator());
  }

  Context& ctx_;
  bool ok_ = true;
};

using CaseFn = std::function<Outputs(Runner&)>;

struct ParityCase {
  std::string name;  // gtest name: letters, digits and underscores
  CaseFn run;
};

// ---- case builders, one per op family -------------------------------------------------------

void AddMatmulCases(std::vector<ParityCase>& cases, DType dt) {
  struct Mnk {
    int64_t m, n, k;
  };
  for (Mnk s : {Mnk{1, 96, 200}, Mnk{17, 200, 96}, Mnk{127, 1000, 96}, Mnk{3, 17, 127},
                Mnk{300, 96, 200}}) {
    for (int t = 0; t < 4; ++t) {
      const bool ta = t & 1, tb = t & 2;
      // Plain: c in the case dtype, beta = 0 over a NaN-filled c.
      cases.push_back({StrCat("Matmul_M", s.m, "_N", s.n, "_K", s.k, ta ? "_ta" : "",
                              tb ? "_tb" : "", "_", DTypeName(dt)),
                       [=](Runner& r) -> Outputs {
                         Tensor a = ta ? r.Random({s.k, s.m}, 1, dt) : r.Random({s.m, s.k}, 1, dt);
                         Tensor b = tb ? r.Random({s.n, s.k}, 2, dt) : r.Random({s.k, s.n}, 2, dt);
                         Tensor c = r.Nan({s.m, s.n}, dt);
                         r.Run(Matmul(r.ctx(), c, a, b, ta, tb), "Matmul");
                         return {{"c", r.Fetch(c), Reduce(dt)}};
                       }});
    }
    // Row views of wider buffers, alpha/beta, f32 c accumulating over bf16 or f32 a, b.
    cases.push_back(
        {StrCat("Matmul_M", s.m, "_N", s.n, "_K", s.k, "_views_beta1_", DTypeName(dt)),
         [=](Runner& r) -> Outputs {
           Tensor a = r.Random({s.m, s.k + 8}, 3, dt).Slice(1, 8, 8 + s.k);
           Tensor b = r.Random({s.n, s.k + 5}, 4, dt).Slice(1, 0, s.k);
           Tensor c_buf = r.RandomAs({s.m, s.n + 3}, 5, DType::kF32);
           Tensor c = c_buf.Slice(1, 0, s.n);
           r.Run(Matmul(r.ctx(), c, a, b, false, true, 0.5f, 1.0f), "Matmul");
           return {{"c", r.Fetch(c_buf), dt == DType::kBF16 ? kF32Accumulated : kF32Reduce}};
         }});
    // c in the case dtype, a column block of a wider fused buffer (as LoRA's y += s h B^T into
    // the k block of q|k|v): alpha 0.5, beta 1; the columns around the block must not change.
    cases.push_back(
        {StrCat("Matmul_M", s.m, "_N", s.n, "_K", s.k, "_fused_block_beta1_", DTypeName(dt)),
         [=](Runner& r) -> Outputs {
           Tensor a = r.Random({s.m, s.k}, 12, dt);
           Tensor b = r.Random({s.n, s.k}, 13, dt);
           Tensor c_buf = r.Random({s.m, 64 + s.n + 32}, 14, dt);  // [M, 64 | N | 32]
           Tensor c = c_buf.Slice(1, 64, 64 + s.n);
           r.Run(Matmul(r.ctx(), c, a, b, false, true, 0.5f, 1.0f), "Matmul");
           return {{"c", r.Fetch(c_buf), Reduce(dt)}};
         }});
  }
}

void AddEmbeddingCases(std::vector<ParityCase>& cases, DType dt) {
  for (int64_t n : {1, 17, 127, 300, 3000}) {
    for (int64_t c : {96, 200}) {
      // 300 tokens over 50 ids: many repeats; 3000 over 5: runs longer than a block's key scan
      const int64_t vocab = n == 300 ? 50 : n == 3000 ? 5 : 1000;
      cases.push_back(
          {StrCat("EmbeddingForward_N", n, "_C", c, "_", DTypeName(dt)), [=](Runner& r) -> Outputs {
             Tensor table = r.Random({vocab, c}, 6, dt);
             Tensor ids = r.Put(::tandem::testing::RandomInts({n}, 7, vocab));
             Tensor out = r.Nan({n, c}, dt);
             r.Run(EmbeddingForward(r.ctx(), out, ids, table), "EmbeddingForward");
             return {{"out", r.Fetch(out), kExact}};
           }});
      cases.push_back({StrCat("EmbeddingBackward_N", n, "_C", c, "_", DTypeName(dt)),
                       [=](Runner& r) -> Outputs {
                         Tensor dout = r.Random({n, c}, 8, dt);
                         Tensor ids = r.Put(::tandem::testing::RandomInts({n}, 9, vocab));
                         Tensor dtable = r.RandomAs({vocab, c}, 10, DType::kF32);  // accumulates
                         r.Run(EmbeddingBackward(r.ctx(), dtable, dout, ids), "EmbeddingBackward");
                         return {{"dtable", r.Fetch(dtable), {1e-6, 1e-6}}};
                       }});
    }
  }
}

// with_dw false: dx alone (a frozen norm weight), which takes other kernels.
void AddRmsNormBackwardCases(std::vector<ParityCase>& cases, DType dt, int64_t n, int64_t c,
                             bool with_dw = true) {
  for (bool acc : {false, true}) {
    cases.push_back(
        {StrCat("RmsNormBackward_N", n, "_C", c, acc ? "_acc" : "", with_dw ? "_" : "_dx_only_",
                DTypeName(dt)),
         [=](Runner& r) -> Outputs {
           Tensor x = r.Random({n, c}, 13, dt), w = r.Random({c}, 14, dt, 0.5f, 1.5f);
           Tensor dy = r.Random({n, c}, 15, dt);
           Tensor y = r.Nan({n, c}, dt), rstd = r.Nan({n}, DType::kF32);
           r.Run(RmsNormForward(r.ctx(), y, rstd, x, w, 1e-5f), "RmsNormForward");
           Tensor dx = acc ? r.Random({n, c}, 16, dt) : r.Nan({n, c}, dt);
           Tensor dw = with_dw ? r.RandomAs({c}, 17, DType::kF32) : Tensor();
           r.Run(RmsNormBackward(r.ctx(), dx, dw, dy, x, w, rstd, acc), "RmsNormBackward");
           if (!with_dw) return {{"dx", r.Fetch(dx), Reduce(dt)}};
           return {{"dx", r.Fetch(dx), Reduce(dt)},
                   {"dw", r.Fetch(dw), dt == DType::kBF16 ? kF32Accumulated : kF32Reduce}};
         }});
  }
}

void AddRmsNormCases(std::vector<ParityCase>& cases, DType dt) {
  // Rows of 96 and 200 columns read as scalars (row views with an odd stride), 256 to 4096 in
  // 16-byte packs.
  for (auto [n, c] : std::vector<std::pair<int64_t, int64_t>>{{1, 96},
                                                              {3, 96},
                                                              {17, 96},
                                                              {127, 96},
                                                              {1, 200},
                                                              {3, 200},
                                                              {17, 200},
                                                              {127, 200},
                                                              {5, 256},
                                                              {33, 768},
                                                              {9, 2048},
                                                              {3, 4096}}) {
    const int64_t pad = c % 256 == 0 ? 8 : 4;  // the row view's stride: packs or scalars
    {
      cases.push_back(
          {StrCat("RmsNormForward_N", n, "_C", c, "_", DTypeName(dt)), [=](Runner& r) -> Outputs {
             Tensor x = r.Random({n, c + pad}, 11, dt).Slice(1, 0, c);  // row view
             Tensor w = r.Random({c}, 12, dt, 0.5f, 1.5f);
             Tensor y = r.Nan({n, c}, dt), rstd = r.Nan({n}, DType::kF32);
             r.Run(RmsNormForward(r.ctx(), y, rstd, x, w, 1e-5f), "RmsNormForward");
             return {{"y", r.Fetch(y), Reduce(dt)}, {"rstd", r.Fetch(rstd), kF32Accumulated}};
           }});
      // The fused residual add + norm, once into a fresh sum and once in place over a.
      for (bool in_place : {false, true}) {
        cases.push_back(
            {StrCat("AddRmsNormForward_N", n, "_C", c, in_place ? "_inplace_" : "_", DTypeName(dt)),
             [=](Runner& r) -> Outputs {
               // A row view, or (in place: Fetch reads contiguous tensors) a contiguous one.
               Tensor a = in_place ? r.Random({n, c}, 21, dt)
                                   : r.Random({n, c + 8}, 21, dt).Slice(1, 0, c);
               Tensor b = r.Random({n, c}, 22, dt);
               Tensor w = r.Random({c}, 23, dt, 0.5f, 1.5f);
               Tensor sum = in_place ? a : r.Nan({n, c}, dt), y = r.Nan({n, c}, dt);
               r.Run(AddRmsNormForward(r.ctx(), sum, y, a, b, w, 1e-5f), "AddRmsNormForward");
               return {{"sum", r.Fetch(sum), Reduce(dt)}, {"y", r.Fetch(y), Reduce(dt)}};
             }});
      }
      AddRmsNormBackwardCases(cases, dt, n, c);
      AddRmsNormBackwardCases(cases, dt, n, c, false);
    }
  }
  // Rows spread over row groups of several rows; a row over 2 or 4 packs a thread; odd widths
  // (scalar accesses); a row wider than the one-pass kernel holds (the two-kernel path).
  for (auto [n, c] : std::vector<std::pair<int64_t, int64_t>>{
           {1029, 2048}, {600, 4100}, {70, 1025}, {64, 6144}, {37, 20000}}) {
    AddRmsNormBackwardCases(cases, dt, n, c);
  }
}

void AddRopeCases(std::vector<ParityCase>& cases, DType dt) {
  for (int64_t n : {1, 17, 127}) {
    for (int64_t h : {3, 6}) {
      for (int64_t d : {64, 128, 18}) {  // 18: D/2 = 9 is not a whole 16-byte pack
        for (bool inverse : {false, true}) {
          cases.push_back(
              {StrCat("Rope_N", n, "_H", h, "_D", d, inverse ? "_inverse_" : "_", DTypeName(dt)),
               [=](Runner& r) -> Outputs {
                 // q of a fused [N, 3H, D] buffer, rotated in place; k, v untouched.
                 Tensor qkv = r.Random({n, 3 * h, d}, 18, dt);
                 Tensor q = qkv.Slice(1, 0, h);
                 Tensor pos = r.Put(::tandem::testing::RandomInts({n}, 19, 4096));
                 Tensor inv_freq = r.Put(testing::InvFreq(d, 500000.0));
                 r.Run(Rope(r.ctx(), q, q, pos, inv_freq, inverse), "Rope");
                 return {{"qkv", r.Fetch(qkv), Elementwise(dt)}};
               }});
        }
      }
    }
  }
}

struct AttnSizes {
  int64_t b, t, hq, hkv, d;
  bool segments, fused;
};

// Packed documents: segment ids that step up at random token boundaries.
Tensor PackedSegments(int64_t b, int64_t t, uint64_t seed) {
  Tensor bounds = ::tandem::testing::RandomInts({b, t}, seed, 23);  // ~1 boundary per 23 tokens
  Tensor seg = Tensor::Cpu({b, t}, DType::kI32);
  for (int64_t i = 0; i < b; ++i) {
    int32_t id = 0;
    for (int64_t j = 0; j < t; ++j) {
      if (j > 0 && bounds.data<int32_t>()[i * t + j] == 0) ++id;
      seg.data<int32_t>()[i * t + j] = id;
    }
  }
  return seg;
}

// q, k, v: contiguous, or views into one fused [B, T, Hq + 2 Hkv, D] buffer (then dq, dk, dv are
// views into a fused gradient buffer too, as the model uses them).
struct Qkv {
  Tensor q, k, v, fused;
};
Qkv MakeQkv(Runner& r, const AttnSizes& s, uint64_t seed, bool nan) {
  const DType bf16 = DType::kBF16;
  auto make = [&](const Shape& shape, uint64_t sd) {
    return nan ? r.Nan(shape, bf16) : r.Random(shape, sd, bf16, -2.0f, 2.0f);
  };
  if (!s.fused) {
    return {make({s.b, s.t, s.hq, s.d}, seed), make({s.b, s.t, s.hkv, s.d}, seed + 1),
            make({s.b, s.t, s.hkv, s.d}, seed + 2), Tensor()};
  }
  Tensor all = make({s.b, s.t, s.hq + 2 * s.hkv, s.d}, seed);
  return {all.Slice(2, 0, s.hq), all.Slice(2, s.hq, s.hq + s.hkv),
          all.Slice(2, s.hq + s.hkv, s.hq + 2 * s.hkv), all};
}

// Selects the CUDA attention kernels for one case and restores the default after it.
class AttentionKernelScope {
 public:
  explicit AttentionKernelScope(AttentionKernel kernel) { SetAttentionKernel(kernel); }
  ~AttentionKernelScope() { SetAttentionKernel(AttentionKernel::kAuto); }
  AttentionKernelScope(const AttentionKernelScope&) = delete;
  AttentionKernelScope& operator=(const AttentionKernelScope&) = delete;
};

void AddAttentionCases(std::vector<ParityCase>& cases) {
  const AttnSizes sizes[] = {
      {1, 1, 3, 1, 64, false, false},    {2, 17, 3, 1, 64, true, false},
      {1, 127, 6, 2, 128, false, true},  {2, 300, 4, 4, 64, true, false},
      {1, 300, 6, 2, 128, true, true},   {2, 127, 4, 4, 128, false, false},
      {1, 17, 6, 2, 64, false, false},   {2, 1, 4, 4, 128, true, false},
      {1, 300, 3, 1, 64, false, false},  {1, 127, 3, 1, 128, true, false},
      {1, 700, 4, 2, 128, false, false}, {2, 520, 2, 1, 64, true, false},
  };
  for (const AttnSizes& s : sizes) {
    const std::string name =
        StrCat("_B", s.b, "_T", s.t, "_Hq", s.hq, "_Hkv", s.hkv, "_D", s.d,
               s.segments ? "_segments" : "", s.fused ? "_fused" : "", "_bf16");
    const float scale = 1.0f / std::sqrt(static_cast<float>(s.d));
    auto forward = [=](Runner& r, Qkv& in, Tensor& out, Tensor& lse, Tensor& seg) {
      in = MakeQkv(r, s, 21, false);
      seg = s.segments ? r.Put(PackedSegments(s.b, s.t, 24)) : Tensor();
      out = r.Nan({s.b, s.t, s.hq, s.d}, DType::kBF16);
      lse = r.Nan({s.b, s.hq, s.t}, DType::kF32);
      r.Run(AttentionForward(r.ctx(), out, lse, in.q, in.k, in.v, scale, seg), "AttentionForward");
    };
    for (const AttentionKernel kernel : {AttentionKernel::kAuto, AttentionKernel::kMmaSync}) {
      // kAuto runs the wgmma kernels on an H100; "_mma" keeps the mma.sync kernels tested there.
      const std::string suffix = kernel == AttentionKernel::kMmaSync ? "_mma" : "";
      cases.push_back(
          {"AttentionForward" + name + suffix, [=](Runner& r) -> Outputs {
             const AttentionKernelScope use(kernel);
             Qkv in;
             Tensor out, lse, seg;
             forward(r, in, out, lse, seg);
             return {{"out", r.Fetch(out), kBf16Reduce}, {"lse", r.Fetch(lse), kF32Accumulated}};
           }});
    }
    // kAuto on an H100: dQ inside the dK/dV kernel; "_split": the wgmma dQ kernel of its own.
    for (const AttentionKernel kernel :
         {AttentionKernel::kAuto, AttentionKernel::kWgmmaSplitDq, AttentionKernel::kMmaSync}) {
      const std::string suffix = kernel == AttentionKernel::kMmaSync        ? "_mma"
                                 : kernel == AttentionKernel::kWgmmaSplitDq ? "_split"
                                                                            : "";
      cases.push_back({"AttentionBackward" + name + suffix, [=](Runner& r) -> Outputs {
                         const AttentionKernelScope use(kernel);
                         Qkv in;
                         Tensor out, lse, seg;
                         forward(r, in, out, lse, seg);
                         Tensor dout = r.Random({s.b, s.t, s.hq, s.d}, 25, DType::kBF16);
                         Qkv grad = MakeQkv(r, s, 0, true);
                         r.Run(AttentionBackward(r.ctx(), grad.q, grad.k, grad.v, dout, in.q, in.k,
                                                 in.v, out, lse, scale, seg),
                               "AttentionBackward");
                         if (s.fused) return {{"dqkv", r.Fetch(grad.fused), kBf16Reduce}};
                         return {{"dq", r.Fetch(grad.q), kBf16Reduce},
                                 {"dk", r.Fetch(grad.k), kBf16Reduce},
                                 {"dv", r.Fetch(grad.v), kBf16Reduce}};
                       }});
    }
  }
}

void AddSwigluCases(std::vector<ParityCase>& cases, DType dt) {
  for (int64_t n : {1, 17, 127}) {
    for (int64_t f : {96, 200}) {
      const std::string name = StrCat("_N", n, "_F", f, "_", DTypeName(dt));
      // gate and up are views into one fused [N, 2F] projection, as in the model.
      cases.push_back({"SwigluForward" + name, [=](Runner& r) -> Outputs {
                         Tensor gu = r.Random({n, 2 * f}, 26, dt, -4.0f, 4.0f);
                         Tensor out = r.Nan({n, f}, dt);
                         r.Run(
                             SwigluForward(r.ctx(), out, gu.Slice(1, 0, f), gu.Slice(1, f, 2 * f)),
                             "SwigluForward");
                         return {{"out", r.Fetch(out), Elementwise(dt)}};
                       }});
      cases.push_back({"SwigluBackward" + name, [=](Runner& r) -> Outputs {
                         Tensor gu = r.Random({n, 2 * f}, 27, dt, -4.0f, 4.0f);
                         Tensor dout = r.Random({n, f}, 28, dt);
                         Tensor dgu = r.Nan({n, 2 * f}, dt);
                         Tensor dgate = dgu.Slice(1, 0, f), dup = dgu.Slice(1, f, 2 * f);
                         r.Run(SwigluBackward(r.ctx(), dgate, dup, dout, gu.Slice(1, 0, f),
                                              gu.Slice(1, f, 2 * f)),
                               "SwigluBackward");
                         return {{"dgate|dup", r.Fetch(dgu), Elementwise(dt)}};
                       }});
    }
  }
}

void AddCrossEntropyCases(std::vector<ParityCase>& cases, DType dt) {
  for (int64_t n : {1, 3, 17}) {
    for (int64_t v : {1000, 32001}) {
      for (bool in_place : {false, true}) {
        cases.push_back(
            {StrCat("CrossEntropy_N", n, "_V", v, in_place ? "_inplace_" : "_", DTypeName(dt)),
             [=](Runner& r) -> Outputs {
               Tensor logits = r.Random({n, v}, 29, dt, -4.0f, 4.0f);
               Tensor targets = ::tandem::testing::RandomInts({n}, 30, static_cast<int32_t>(v));
               if (n > 1) targets.data<int32_t>()[n / 2] = kIgnoreIndex;
               Tensor t = r.Put(targets);
               Tensor losses = r.Nan({n}, DType::kF32);
               Tensor dlogits = in_place ? logits : r.Nan({n, v}, dt);
               r.Run(CrossEntropy(r.ctx(), losses, dlogits, logits, t, 0.25f), "CrossEntropy");
               // Softmax entries are ~1/V: a relative rule with a tiny abs floor.
               const Tol grad_tol{1e-6, dt == DType::kBF16 ? 2e-2 : 1e-4};
               return {{"losses", r.Fetch(losses), {2e-5, 2e-5}},
                       {"dlogits", r.Fetch(dlogits), grad_tol}};
             }});
      }
    }
  }
}

// The vocabulary split over R simulated ranks (the last one with padding columns): every rank's
// partials, then every rank's losses and in-place gradient from the gathered partials.
void AddShardedCrossEntropyCases(std::vector<ParityCase>& cases, DType dt) {
  for (int64_t n : {1, 19}) {
    for (int64_t ranks : {1, 2, 3}) {
      for (int64_t cols : {504, 16001}) {
        cases.push_back(
            {StrCat("ShardedCrossEntropy_N", n, "_R", ranks, "_Vl", cols, "_", DTypeName(dt)),
             [=](Runner& r) -> Outputs {
               const int64_t pad = 7, vocab = ranks * cols - pad;
               Tensor targets = ::tandem::testing::RandomInts({n}, 40, static_cast<int32_t>(vocab));
               if (n > 1) targets.data<int32_t>()[n / 2] = kIgnoreIndex;
               if (n > 2) targets.data<int32_t>()[1] = static_cast<int32_t>(vocab - 1);
               Tensor t = r.Put(targets);
               Tensor all = r.NanAs({ranks, n, 3}, DType::kF32);
               std::vector<Tensor> logits;
               for (int64_t k = 0; k < ranks; ++k) {
                 logits.push_back(r.Random({n, cols}, 41 + k, dt, -4.0f, 4.0f));
                 const int64_t valid = std::min(cols, vocab - k * cols);
                 Tensor part = all.Slice(0, k, k + 1).View({n, 3});
                 r.Run(ShardedCrossEntropyPartials(r.ctx(), part, logits[k], t, k * cols, valid),
                       "ShardedCrossEntropyPartials");
               }
               Outputs out = {{"partials", r.Fetch(all), {1e-6, 1e-5}}};
               for (int64_t k = 0; k < ranks; ++k) {
                 const int64_t valid = std::min(cols, vocab - k * cols);
                 Tensor losses = r.Nan({n}, DType::kF32);
                 r.Run(ShardedCrossEntropyFinish(r.ctx(), losses, logits[k], logits[k], all, t,
                                                 k * cols, valid, 0.5f),
                       "ShardedCrossEntropyFinish");
                 const Tol grad_tol{1e-6, dt == DType::kBF16 ? 2e-2 : 1e-4};
                 out.push_back({StrCat("losses_rank", k), r.Fetch(losses), {2e-5, 2e-5}});
                 out.push_back({StrCat("dlogits_rank", k), r.Fetch(logits[k]), grad_tol});
               }
               return out;
             }});
      }
    }
  }
}

void AddOptimizerAndElementwiseCases(std::vector<ParityCase>& cases) {
  for (int64_t n : {1, 1000, 100003}) {
    for (DType wd : {DType::kBF16, DType::kF32}) {
      cases.push_back(
          {StrCat("AdamW_n", n, "_weights_", DTypeName(wd)), [=](Runner& r) -> Outputs {
             const DType f32 = DType::kF32;
             Tensor master = r.RandomAs({n}, 31, f32), m = r.RandomAs({n}, 32, f32, -0.1f, 0.1f);
             Tensor v = r.RandomAs({n}, 33, f32, 0.0f, 0.01f), grad = r.RandomAs({n}, 34, f32);
             Tensor weights = r.NanAs({n}, wd);
             AdamWParams p;
             p.lr = 3e-3f;
             p.weight_decay = 0.1f;
             p.step = 7;
             p.grad_scale = 0.5f;
             r.Run(AdamW(r.ctx(), master, m, v, weights, grad, p), "AdamW");
             const Tol f32_tol{1e-6, 1e-5};
             return {{"master", r.Fetch(master), f32_tol},
                     {"m", r.Fetch(m), f32_tol},
                     {"v", r.Fetch(v), f32_tol},
                     // One rounding of master: may differ by one bf16 ulp at a tie.
                     {"weights", r.Fetch(weights), wd == DType::kBF16 ? Tol{0, 8e-3} : f32_tol}};
           }});
    }
  }
  for (int64_t n : {1, 17, 100003, 1 << 20}) {
    for (DType dt : {DType::kBF16, DType::kF32, DType::kF16}) {
      const std::string name = StrCat("_n", n, "_", DTypeName(dt));
      cases.push_back({"SumSquares" + name, [=](Runner& r) -> Outputs {
                         Tensor x = r.RandomAs({n}, 36, dt);
                         Tensor out = r.RandomAs({1}, 37, DType::kF32, 1.0f, 2.0f);  // accumulates
                         r.Run(SumSquares(r.ctx(), out, x), "SumSquares");
                         return {{"out", r.Fetch(out), {0, 1e-5}}};
                       }});
      cases.push_back({"AddScaleFill" + name, [=](Runner& r) -> Outputs {
                         Tensor a = r.RandomAs({n}, 38, dt), b = r.RandomAs({n}, 39, dt);
                         Tensor sum = r.RandomAs({n}, 40, dt);
                         r.Run(Add(r.ctx(), sum, a, b), "Add");
                         r.Run(Add(r.ctx(), a, a, b), "Add in place");
                         r.Run(Scale(r.ctx(), b, -0.37f), "Scale");
                         Tensor ints = r.Put(Tensor::CpuZeros({n}, DType::kI32));
                         r.Run(Fill(r.ctx(), ints, -7.9f), "Fill");
                         // Math in f32, one rounding on store, the same on both sides: exact.
                         return {{"sum", r.Fetch(sum), kExact},
                                 {"a+=b", r.Fetch(a), kExact},
                                 {"scaled", r.Fetch(b), kExact},
                                 {"filled", r.Fetch(ints), kExact}};
                       }});
      for (DType to : {DType::kBF16, DType::kF32, DType::kF16}) {
        cases.push_back({StrCat("Cast_n", n, "_", DTypeName(dt), "_to_", DTypeName(to)),
                         [=](Runner& r) -> Outputs {
                           Tensor in = r.RandomAs({n}, 41, dt, -300.0f, 300.0f);
                           Tensor out = r.RandomAs({n}, 42, to);
                           r.Run(Cast(r.ctx(), out, in), "Cast");
                           return {{"out", r.Fetch(out), kExact}};
                         }});
      }
    }
  }
  // A column block of one matrix into a column block of another (LoRA's wide weights).
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 1}, {7, 13}, {301, 257}}) {
    for (DType dt : {DType::kBF16, DType::kF32}) {
      cases.push_back(
          {StrCat("CopyMatrix_", rows, "x", cols, "_", DTypeName(dt)), [=](Runner& r) -> Outputs {
             Tensor wide = r.RandomAs({rows, cols + 5}, 43, dt);
             const Tensor src = r.RandomAs({rows + 2, cols + 3}, 44, dt);
             Tensor dst = wide.Slice(1, 2, 2 + cols);
             r.Run(CopyMatrix(r.ctx(), dst, src.Slice(0, 1, 1 + rows).Slice(1, 3, 3 + cols)),
                   "CopyMatrix");
             return {{"wide", r.Fetch(wide), kExact}};
           }});
      // Ten pairs (two launches), narrow and wide rows, aligned and not, in one call.
      cases.push_back(
          {StrCat("CopyMatrices_", rows, "x", cols, "_", DTypeName(dt)), [=](Runner& r) -> Outputs {
             Tensor wide = r.RandomAs({rows, 10 * (cols + 3)}, 47, dt);
             const Tensor src = r.RandomAs({rows, 10 * cols + 1}, 48, dt);
             std::vector<Tensor> dsts;
             std::vector<Tensor> srcs;
             for (int64_t i = 0; i < 10; ++i) {
               const int64_t at = i * (cols + 3) + i % 3;
               dsts.push_back(wide.Slice(1, at, at + cols));
               srcs.push_back(src.Slice(1, i * cols + i % 2, (i + 1) * cols + i % 2));
             }
             r.Run(CopyMatrices(r.ctx(), dsts, srcs), "CopyMatrices");
             return {{"wide", r.Fetch(wide), kExact}};
           }});
      // 16-byte aligned narrow rows: the kernel's widest unit.
      cases.push_back({StrCat("CopyMatrix_aligned_", rows, "x", cols, "_", DTypeName(dt)),
                       [=](Runner& r) -> Outputs {
                         Tensor wide = r.RandomAs({rows, 64 + 16}, 45, dt);
                         const Tensor src = r.RandomAs({rows, 8}, 46, dt);
                         Tensor dst = wide.Slice(1, 64, 72);
                         r.Run(CopyMatrix(r.ctx(), dst, src), "CopyMatrix");
                         return {{"wide", r.Fetch(wide), kExact}};
                       }});
    }
  }
}

std::vector<ParityCase> AllCases() {
  std::vector<ParityCase> cases;
  for (DType dt : {DType::kBF16, DType::kF32}) {
    AddMatmulCases(cases, dt);
    AddEmbeddingCases(cases, dt);
    AddRmsNormCases(cases, dt);
    AddRopeCases(cases, dt);
    AddSwigluCases(cases, dt);
    AddCrossEntropyCases(cases, dt);
    AddShardedCrossEntropyCases(cases, dt);
  }
  AddAttentionCases(cases);  // bf16 only on CUDA
  AddOptimizerAndElementwiseCases(cases);
  return cases;
}

// |a - e| <= tol.abs_of_max * max(max|e|, 1e-4) + tol.rel * |e| for every element. The floor
// covers outputs that vanish in exact arithmetic (dq and dk of a one-token sequence), where
// cancellation leaves noise of ~1e-7 that no relative bound can accept.
::testing::AssertionResult Matches(const Tensor& got, const Tensor& want, Tol tol) {
  double max_abs = 1e-4;
  for (int64_t i = 0; i < want.numel(); ++i) {
    max_abs = std::max(max_abs, std::fabs(static_cast<double>(want.data<float>()[i])));
  }
  return testing::AllClose(got, want, {tol.abs_of_max * max_abs, tol.rel});
}

// One CUDA context for the whole suite (created once, destroyed before exit, not at exit).
class OpsParityTest : public ::testing::TestWithParam<ParityCase> {
 protected:
  static void SetUpTestSuite() {
    if (!CudaAvailable()) return;
    StatusOr<std::unique_ptr<Context>> ctx = Context::Cuda(0);
    TANDEM_CHECK_OK(ctx.status());
    cuda_ = std::move(*ctx).release();
  }
  static void TearDownTestSuite() {
    delete cuda_;
    cuda_ = nullptr;
  }
  static Context* cuda_;
};
Context* OpsParityTest::cuda_ = nullptr;

TEST_P(OpsParityTest, CudaMatchesCpu) {
  TANDEM_SKIP_WITHOUT_GPU();
  const ParityCase& c = GetParam();
  auto cpu_ctx = Context::Cpu();
  Runner cpu(*cpu_ctx), gpu(*cuda_);
  const Outputs want = c.run(cpu);
  const Outputs got = c.run(gpu);
  ASSERT_TRUE(cpu.ok() && gpu.ok());
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_TRUE(Matches(got[i].host, want[i].host, want[i].tol))
        << "output '" << want[i].name << "'";
  }
}

INSTANTIATE_TEST_SUITE_P(AllOps, OpsParityTest, ::testing::ValuesIn(AllCases()),
                         [](const ::testing::TestParamInfo<ParityCase>& info) {
                           return info.param.name;
                         });

// The ops whose CUDA kernels reduce across threads: two runs must give identical bytes.
class OpsCudaDeterminismTest : public OpsParityTest {};

TEST_P(OpsCudaDeterminismTest, TwoRunsAreBitwiseEqual) {
  TANDEM_SKIP_WITHOUT_GPU();
  Runner first(*cuda_), second(*cuda_);
  const Outputs a = GetParam().run(first);
  const Outputs b = GetParam().run(second);
  ASSERT_TRUE(first.ok() && second.ok());
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(testing::BitwiseEqual(a[i].host, b[i].host)) << "output '" << a[i].name << "'";
  }
}

std::vector<ParityCase> DeterminismCases() {
  const char* names[] = {"EmbeddingBackward_N300_C200_bf16",
                         "EmbeddingBackward_N3000_C200_bf16",
                         "RmsNormBackward_N127_C200_bf16",
                         "RmsNormBackward_N1029_C2048_bf16",
                         "AttentionBackward_B1_T300_Hq6_Hkv2_D128_segments_fused_bf16",
                         "AttentionBackward_B2_T300_Hq4_Hkv4_D64_segments_bf16",
                         "SumSquares_n1048576_bf16",
                         "SumSquares_n100003_f32"};
  std::vector<ParityCase> all = AllCases(), picked;
  for (const char* name : names) {
    auto it =
        std::find_if(all.begin(), all.end(), [&](const ParityCase& c) { return c.name == name; });
    TANDEM_CHECK_MSG(it != all.end(), "no parity case named ", name);
    picked.push_back(*it);
  }
  return picked;
}

INSTANTIATE_TEST_SUITE_P(ReducingOps, OpsCudaDeterminismTest,
                         ::testing::ValuesIn(DeterminismCases()),
                         [](const ::testing::TestParamInfo<ParityCase>& info) {
                           return info.param.name;
                         });

}  // namespace
}  // namespace tandem::ops
