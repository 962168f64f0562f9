// CUDA vs CPU parity of the segmented LoRA ops (ops/lora.h), table driven: odd sizes, ranks 1, 8,
// 16 and 64 mixed in one batch, segments of length 1, 3 and 127, empty segments, tokens without an
// adapter, rank-0 adapters, dropout, y and dy as column blocks of wider (fused) outputs, f32 and
// bf16. Each case runs every op on a CPU context (f32, the case's inputs rounded to its dtype) and
// on a CUDA context (the case's dtype); every element of every output is compared:
//   |cuda - cpu| <= abs * max|cpu| + rel * |cpu|
//   f32: abs 1e-5, rel 1e-4 (summation order only). bf16: abs 2e-2, rel 2e-2 for everything (h
//   and dh are rounded to bf16 on the GPU before the ops that read them, so even the f32 weight
//   gradients sum slightly different products). The dropout op: exact in f32, rel 1e-2 in bf16.
// Plus: the CUDA weight gradients are bitwise identical across two runs (no atomics), and the
// dropout op's mask equals the CPU's exactly.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "ops/lora.h"
#include "tests/ops/op_test_util.h"

namespace tandem::ops {
namespace {

using testing::RandomUniform;

constexpr uint64_t kSeed = 0xd50;

struct Segment {
  int32_t len;
  int32_t adapter;
};

struct Case {
  const char* name;
  int64_t in, out;
  std::vector<Segment> segments;
  std::vector<int32_t> ranks;
  std::vector<float> dropout;
  DType dtype;
  int64_t pad;  // y/dy live in columns [pad, pad + out) of a [N, out + 2 pad] buffer
};

const std::vector<Case>& Cases() {
  static const std::vector<Case> cases = {
      {"mixed_ranks_f32",
       67,
       131,
       {{1, 0}, {3, 1}, {127, 2}, {1, 3}, {3, -1}, {127, 3}, {3, 0}, {1, 2}},
       {1, 8, 16, 64},
       {0, 0, 0, 0},
       DType::kF32,
       0},
      {"mixed_ranks_bf16",
       67,
       131,
       {{1, 0}, {3, 1}, {127, 2}, {1, 3}, {3, -1}, {127, 3}, {3, 0}, {1, 2}},
       {1, 8, 16, 64},
       {0, 0, 0, 0},
       DType::kBF16,
       0},
      {"dropout_strided_bf16",
       200,
       96,
       {{127, 0}, {3, 1}, {1, 0}, {127, 1}},
       {8, 64},
       {0.1f, 0.5f},
       DType::kBF16,
       5},
      {"dropout_strided_f32",
       45,
       77,
       {{3, 1}, {127, 0}, {1, -1}, {3, 0}},
       {16, 1},
       {0.25f, 0.0f},
       DType::kF32,
       3},
      {"one_segment_f32", 128, 384, {{300, 0}}, {16}, {0}, DType::kF32, 0},
      {"rank0_and_empty_f32",
       33,
       17,
       {{5, 0}, {0, 1}, {7, 1}, {1, 2}, {0, -1}, {3, 2}},
       {0, 16, 1},
       {0, 0, 0},
       DType::kF32,
       0},
      {"long_k_bf16", 1000, 33, {{40, 0}, {1, 1}, {127, 0}}, {64, 8}, {0, 0.2f}, DType::kBF16, 0},
      // Decode-like: a few tokens per adapter and long reductions both ways (in, out >= 256): the
      // forward runs the gather kernels of thin batches (a scalar and a vector shrink), the
      // expand gradient split-K with its fixed-order second pass.
      {"decode_split_k_f32",
       777,
       300,
       {{1, 0}, {2, 1}, {1, 2}, {3, 0}, {1, -1}},
       {16, 5, 33},
       {0.1f, 0, 0},
       DType::kF32,
       2},
      {"decode_split_k_bf16",
       2048,
       2048,
       {{4, 0}, {4, 1}, {4, 2}, {4, 3}},
       {16, 16, 8, 16},
       {0, 0, 0, 0},
       DType::kBF16,
       0},
      // More tokens than the gather kernels take, in few tiles with a long K: the tiled shrink
      // runs split-K and LoraDelta's expand sums the slices as it loads h.
      {"split_k_fused_bf16",
       2048,
       512,
       {{100, 0}, {90, 1}, {80, 2}},
       {16, 8, 16},
       {0, 0, 0},
       DType::kBF16,
       0},
  };
  return cases;
}

struct Tol {
  double abs_of_max, rel;
};

::testing::AssertionResult Close(const Tensor& cuda, const Tensor& cpu, Tol tol) {
  double max_abs = 0.0;
  for (int64_t i = 0; i < cpu.numel(); ++i) {
    max_abs = std::max(max_abs, std::abs(static_cast<double>(cpu.data<float>()[i])));
  }
  return ::tandem::testing::AllClose(cuda, cpu, {tol.abs_of_max * max_abs, tol.rel});
}

Tensor RoundTo(const Tensor& host_f32, DType dtype) {
  if (dtype == DType::kF32) return host_f32;
  return *CastCpu(*CastCpu(host_f32, dtype), DType::kF32);
}

// The inputs of one case on the host, f32 values already representable in the case dtype.
struct Inputs {
  std::vector<int32_t> seg_start{0}, seg_adapter;
  int64_t N = 0;
  std::vector<Tensor> A, B;
  Tensor x, y_wide, dy_wide;  // [N, in], [N, out + 2 pad] x2
};

Inputs MakeInputs(const Case& c) {
  Inputs in;
  for (const Segment& s : c.segments) {
    in.seg_start.push_back(in.seg_start.back() + s.len);
    in.seg_adapter.push_back(s.adapter);
  }
  in.N = in.seg_start.back();
  for (size_t a = 0; a < c.ranks.size(); ++a) {
    if (c.ranks[a] == 0) {
      in.A.emplace_back();
      in.B.emplace_back();
      continue;
    }
    in.A.push_back(RoundTo(RandomUniform({c.ranks[a], c.in}, 10 * a + 1), c.dtype));
    in.B.push_back(RoundTo(RandomUniform({c.out, c.ranks[a]}, 10 * a + 2), c.dtype));
  }
  in.x = RoundTo(RandomUniform({in.N, c.in}, 100), c.dtype);
  in.y_wide = RoundTo(RandomUniform({in.N, c.out + 2 * c.pad}, 101), c.dtype);
  in.dy_wide = RoundTo(RandomUniform({in.N, c.out + 2 * c.pad}, 102), c.dtype);
  return in;
}

// Every output of one run, fetched to the host as f32.
struct Outputs {
  Tensor h, y_wide, dh, dx, x_drop;
  Tensor y_two_calls, y_delta;  // LoraShrink + LoraExpand (seed 0) and LoraDelta on the same y
  std::vector<Tensor> dA, dB;
};

Tensor ToDevice(Context& ctx, const Tensor& host_f32, DType dtype) {
  if (!ctx.is_cuda()) return testing::Clone(host_f32);
  const Tensor h = dtype == DType::kF32 ? host_f32 : *CastCpu(host_f32, dtype);
  return *CopyToDeviceBlocking(h, ctx.allocator());
}

Tensor ToHost(Context& ctx, const Tensor& t) {
  TANDEM_CHECK_OK(ctx.Synchronize());
  const Tensor h = *CopyToHostBlocking(t);
  return h.dtype() == DType::kF32 ? h : *CastCpu(h, DType::kF32);
}

Outputs RunCase(Context& ctx, const Case& c, const Inputs& in) {
  const DType dt = ctx.is_cuda() ? c.dtype : DType::kF32;
  std::vector<LoraWeights::Entry> we, ge;
  std::vector<Tensor> dA, dB;
  for (size_t a = 0; a < c.ranks.size(); ++a) {
    const float scale = 0.75f + 0.5f * static_cast<float>(a);
    if (c.ranks[a] == 0) {
      we.push_back({Tensor(), Tensor(), scale, c.dropout[a]});
      ge.push_back({});
      dA.emplace_back();
      dB.emplace_back();
      continue;
    }
    we.push_back({ToDevice(ctx, in.A[a], dt), ToDevice(ctx, in.B[a], dt), scale, c.dropout[a]});
    dA.push_back(ToDevice(ctx, Tensor::CpuZeros(in.A[a].shape(), DType::kF32), DType::kF32));
    dB.push_back(ToDevice(ctx, Tensor::CpuZeros(in.B[a].shape(), DType::kF32), DType::kF32));
    ge.push_back({dA.back(), dB.back()});
  }
  const LoraSegments segs = *LoraSegments::Create(ctx, in.seg_start, in.seg_adapter, c.ranks);
  const LoraWeights w = *LoraWeights::Create(ctx, c.in, c.out, we);
  const LoraWeights grads = *LoraWeights::Create(ctx, c.in, c.out, ge);
  const Tensor x = ToDevice(ctx, in.x, dt);
  Tensor y_wide = ToDevice(ctx, in.y_wide, dt);
  const Tensor dy_wide = ToDevice(ctx, in.dy_wide, dt);
  Tensor y = y_wide.Slice(1, c.pad, c.pad + c.out);
  const Tensor dy = dy_wide.Slice(1, c.pad, c.pad + c.out);
  Tensor h = *Tensor::Empty({segs.h_numel()}, dt, ctx.allocator());
  Tensor dh = *Tensor::Empty({segs.h_numel()}, dt, ctx.allocator());
  Tensor dx = ToDevice(ctx, Tensor::CpuZeros({in.N, c.in}, DType::kF32), dt);
  Tensor x_drop = *Tensor::Empty({in.N, c.in}, dt, ctx.allocator());
  TANDEM_CHECK_OK(LoraShrink(ctx, h, x, w, segs, kSeed));
  TANDEM_CHECK_OK(LoraExpand(ctx, y, h, w, segs));
  TANDEM_CHECK_OK(LoraExpandBackward(ctx, dh, &grads, dy, h, w, segs));
  TANDEM_CHECK_OK(LoraShrinkBackward(ctx, dx, &grads, dh, x, w, segs, kSeed));
  TANDEM_CHECK_OK(LoraDropout(ctx, x_drop, x, kSeed, c.dropout[0], false));
  Outputs o{ToHost(ctx, h), ToHost(ctx, y_wide), ToHost(ctx, dh), ToHost(ctx, dx),
            ToHost(ctx, x_drop)};
  {  // ops::LoraDelta against its two calls
    Tensor y2_wide = ToDevice(ctx, in.y_wide, dt), y3_wide = ToDevice(ctx, in.y_wide, dt);
    Tensor y2 = y2_wide.Slice(1, c.pad, c.pad + c.out), y3 = y3_wide.Slice(1, c.pad, c.pad + c.out);
    Tensor h2 = *Tensor::Empty({segs.h_numel()}, dt, ctx.allocator());
    TANDEM_CHECK_OK(LoraShrink(ctx, h2, x, w, segs, 0));
    TANDEM_CHECK_OK(LoraExpand(ctx, y2, h2, w, segs));
    TANDEM_CHECK_OK(LoraDelta(ctx, y3, x, w, segs));
    o.y_two_calls = ToHost(ctx, y2_wide);
    o.y_delta = ToHost(ctx, y3_wide);
  }
  for (size_t a = 0; a < c.ranks.size(); ++a) {
    o.dA.push_back(c.ranks[a] ? ToHost(ctx, dA[a]) : Tensor());
    o.dB.push_back(c.ranks[a] ? ToHost(ctx, dB[a]) : Tensor());
  }
  return o;
}

class LoraParityTest : public ::testing::TestWithParam<size_t> {};

TEST_P(LoraParityTest, CudaMatchesCpu) {
  TANDEM_SKIP_WITHOUT_GPU();
  const Case& c = Cases()[GetParam()];
  SCOPED_TRACE(c.name);
  auto cpu = Context::Cpu();
  auto gpu = *Context::Cuda(0);
  const Inputs in = MakeInputs(c);
  const Outputs ref = RunCase(*cpu, c, in);
  const Outputs got = RunCase(*gpu, c, in);
  const bool bf16 = c.dtype == DType::kBF16;
  const Tol act = bf16 ? Tol{2e-2, 2e-2} : Tol{1e-5, 1e-4};
  EXPECT_TRUE(Close(got.h, ref.h, act)) << "h";
  EXPECT_TRUE(Close(got.y_wide, ref.y_wide, act)) << "y (and the columns around it)";
  EXPECT_TRUE(Close(got.dh, ref.dh, act)) << "dh";
  EXPECT_TRUE(Close(got.dx, ref.dx, act)) << "dx";
  EXPECT_TRUE(Close(got.x_drop, ref.x_drop, bf16 ? Tol{0, 1e-2} : Tol{0, 0})) << "LoraDropout";
  // The fused delta (on CUDA: the expand summing the shrink's split-K slices) is bit for bit the
  // two calls, on both devices.
  for (const Outputs* o : {&ref, &got}) {
    ASSERT_EQ(o->y_delta.numel(), o->y_two_calls.numel());
    EXPECT_EQ(0, std::memcmp(o->y_delta.raw_data(), o->y_two_calls.raw_data(),
                             o->y_delta.num_bytes()))
        << (o == &ref ? "cpu" : "cuda") << ": LoraDelta differs from LoraShrink + LoraExpand";
  }
  for (size_t a = 0; a < c.ranks.size(); ++a) {
    if (c.ranks[a] == 0) continue;
    EXPECT_TRUE(Close(got.dA[a], ref.dA[a], act)) << "dA of adapter " << a;
    EXPECT_TRUE(Close(got.dB[a], ref.dB[a], act)) << "dB of adapter " << a;
  }
  // Deterministic: a second CUDA run gives the same bytes.
  const Outputs again = RunCase(*gpu, c, in);
  for (size_t a = 0; a < c.ranks.size(); ++a) {
    if (c.ranks[a] == 0) continue;
    EXPECT_TRUE(testing::BitwiseEqual(again.dA[a], got.dA[a])) << "dA of adapter " << a;
    EXPECT_TRUE(testing::BitwiseEqual(again.dB[a], got.dB[a])) << "dB of adapter " << a;
  }
  EXPECT_TRUE(testing::BitwiseEqual(again.dx, got.dx));
}

INSTANTIATE_TEST_SUITE_P(Cases, LoraParityTest, ::testing::Range<size_t>(0, Cases().size()),
                         [](const ::testing::TestParamInfo<size_t>& info) {
                           return std::string(Cases()[info.param].name);
                         });

}  // namespace
}  // namespace tandem::ops
