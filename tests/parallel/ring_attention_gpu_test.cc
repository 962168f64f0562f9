// The CUDA pieces of ring attention against the CPU reference (skipped without a GPU). A ring
// needs several devices' communicators, so on one GPU this tests what each ring step runs:
//   - AttentionBlockForward / AttentionBlockBackward with the full mask (the new kernel mode) and
//     the causal mask, bf16, D 64 and 128, odd block lengths, GQA, views into a fused qkv;
//   - AttentionMerge of bf16 blocks into f32 accumulators;
//   - two chunks composed from blocks + merge + summed gradients (step 0 of every ring rank) vs
//     AttentionForward/Backward over the whole sequence on the CPU; bitwise determinism;
//   - ToChunkMajor / FromChunkMajor on the device (exact);
//   - the whole ring (cp 2 and 3) on one GPU: one thread and CUDA context per rank, K/V moved
//     through a test communicator that stages device tensors through a host thread group
//     (HostStagedComm), against CPU whole-sequence attention.
// Inputs are rounded to bf16 on both sides. Tolerances as tests/ops/ops_parity_gpu_test.cc:
// bf16 attention outputs |d| <= 2e-2 * max|cpu| + 2e-2 * |cpu|; f32 lse 2e-4 / 2e-4; f32 merge
// 1e-5 / 1e-5 (only exp/log rounding differs).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <thread>
#include <vector>

#include "collectives/thread_group.h"
#include "ops/context.h"
#include "ops/ops.h"
#include "parallel/ring_attention.h"
#include "tests/common/testing.h"
#include "tests/ops/attention_block_test_util.h"
#include "tests/ops/op_test_util.h"

namespace tandem::ops {
namespace {

struct Tol {
  double abs_of_max, rel;
};
constexpr Tol kBf16Attn{2e-2, 2e-2};
constexpr Tol kF32Lse{2e-4, 2e-4};
constexpr Tol kF32Merge{1e-5, 1e-5};

::testing::AssertionResult Matches(const Tensor& got, const Tensor& want, Tol tol) {
  double max_abs = 1e-4;
  for (int64_t i = 0; i < want.numel(); ++i) {
    max_abs = std::max(max_abs, std::fabs(static_cast<double>(want.data<float>()[i])));
  }
  return ::tandem::testing::AllClose(got, want, {tol.abs_of_max * max_abs, tol.rel});
}

// Host f32 values rounded to bf16 (what both sides compute on).
Tensor RandomBf16Exact(const Shape& shape, uint64_t seed, float lo = -1, float hi = 1) {
  Tensor t = ::tandem::testing::RandomUniform(shape, seed, lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = RoundToBf16(t.data<float>()[i]);
  return t;
}

class RingGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    TANDEM_SKIP_WITHOUT_GPU();
    auto ctx = Context::Cuda(0);
    ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
    gpu_ = std::move(*ctx);
    cpu_ = Context::Cpu();
  }
  // Host f32 -> device tensor of `dtype`.
  Tensor Up(const Tensor& host, DType dtype = DType::kBF16) {
    Tensor typed = dtype == DType::kF32 ? host : *CastCpu(host, dtype);
    return *CopyToDeviceBlocking(typed, gpu_->allocator());
  }
  // Device (any float dtype, contiguous) -> host f32.
  Tensor Down(const Tensor& dev) {
    TANDEM_CHECK_OK(gpu_->Synchronize());
    Tensor host = *CopyToHostBlocking(dev);
    return host.dtype() == DType::kF32 ? host : *CastCpu(host, DType::kF32);
  }
  Tensor GpuEmpty(const Shape& shape, DType dtype) {
    Tensor t = *Tensor::Empty(shape, dtype, gpu_->allocator());
    TANDEM_CHECK_OK(Fill(*gpu_, t, NAN));  // a skipped element fails
    return t;
  }
  std::unique_ptr<Context> gpu_, cpu_;
};

struct BlockSizes {
  int64_t b, t, hq, hkv, d;
  bool fused;
};
const BlockSizes kBlockSizes[] = {{1, 1, 3, 1, 64, false},    {2, 17, 3, 1, 64, false},
                                  {1, 127, 6, 2, 128, true},  {2, 300, 4, 4, 64, false},
                                  {1, 200, 6, 2, 128, false}, {2, 65, 4, 2, 64, true}};

TEST_F(RingGpuTest, BlockForwardAndBackwardMatchCpu) {
  uint64_t seed = 1;
  for (const BlockSizes& s : kBlockSizes) {
    for (AttentionMask mask : {AttentionMask::kFull, AttentionMask::kCausal}) {
      SCOPED_TRACE(::testing::Message() << "B=" << s.b << " T=" << s.t << " Hq=" << s.hq
                                        << " Hkv=" << s.hkv << " D=" << s.d << " fused=" << s.fused
                                        << " full=" << (mask == AttentionMask::kFull));
      const int64_t h_all = s.hq + 2 * s.hkv;
      const Tensor qkv = RandomBf16Exact({s.b, s.t, h_all, s.d}, seed += 10, -2.0f, 2.0f);
      const Tensor dout = RandomBf16Exact({s.b, s.t, s.hq, s.d}, seed + 5);
      const float scale = 1.0f / std::sqrt(static_cast<float>(s.d));
      auto split = [&](const Tensor& all, int part) {  // q, k, v heads of a fused buffer
        const int64_t h0 = part == 0 ? 0 : part == 1 ? s.hq : s.hq + s.hkv;
        return all.Slice(2, h0, h0 + (part == 0 ? s.hq : s.hkv));
      };
      // CPU reference on contiguous copies.
      Tensor cq = testing::Clone(split(qkv, 0)), ck = testing::Clone(split(qkv, 1)),
             cv = testing::Clone(split(qkv, 2));
      Tensor c_out = Tensor::Cpu(cq.shape(), DType::kF32),
             clse = Tensor::Cpu({s.b, s.hq, s.t}, DType::kF32);
      ASSERT_TRUE(AttentionBlockForward(*cpu_, c_out, clse, cq, ck, cv, scale, mask).ok());
      Tensor cdq = Tensor::Cpu(cq.shape(), DType::kF32), cdk = Tensor::Cpu(ck.shape(), DType::kF32),
             cdv = Tensor::Cpu(ck.shape(), DType::kF32);
      ASSERT_TRUE(
          AttentionBlockBackward(*cpu_, cdq, cdk, cdv, dout, cq, ck, cv, c_out, clse, scale, mask)
              .ok());
      // GPU: fused or contiguous operands; backward from the GPU's own forward.
      Tensor g_all = Up(qkv);
      Tensor gq = s.fused ? split(g_all, 0) : Up(cq), gk = s.fused ? split(g_all, 1) : Up(ck),
             gv = s.fused ? split(g_all, 2) : Up(cv);
      Tensor gout = GpuEmpty(cq.shape(), DType::kBF16), glse = GpuEmpty(clse.shape(), DType::kF32);
      ASSERT_TRUE(AttentionBlockForward(*gpu_, gout, glse, gq, gk, gv, scale, mask).ok());
      Tensor gdq = GpuEmpty(cq.shape(), DType::kBF16), gdk = GpuEmpty(ck.shape(), DType::kBF16),
             gdv = GpuEmpty(ck.shape(), DType::kBF16);
      Tensor g_grad_all;
      if (s.fused) {
        g_grad_all = GpuEmpty(qkv.shape(), DType::kBF16);
        gdq = split(g_grad_all, 0);
        gdk = split(g_grad_all, 1);
        gdv = split(g_grad_all, 2);
      }
      ASSERT_TRUE(AttentionBlockBackward(*gpu_, gdq, gdk, gdv, Up(dout), gq, gk, gv, gout, glse,
                                         scale, mask)
                      .ok());
      EXPECT_TRUE(Matches(Down(gout), c_out, kBf16Attn)) << "out";
      EXPECT_TRUE(Matches(Down(glse), clse, kF32Lse)) << "lse";
      if (s.fused) {
        const Tensor all = Down(g_grad_all);
        EXPECT_TRUE(Matches(testing::Clone(split(all, 0)), cdq, kBf16Attn)) << "dq";
        EXPECT_TRUE(Matches(testing::Clone(split(all, 1)), cdk, kBf16Attn)) << "dk";
        EXPECT_TRUE(Matches(testing::Clone(split(all, 2)), cdv, kBf16Attn)) << "dv";
      } else {
        EXPECT_TRUE(Matches(Down(gdq), cdq, kBf16Attn)) << "dq";
        EXPECT_TRUE(Matches(Down(gdk), cdk, kBf16Attn)) << "dk";
        EXPECT_TRUE(Matches(Down(gdv), cdv, kBf16Attn)) << "dv";
      }
    }
  }
}

TEST_F(RingGpuTest, MergeMatchesCpu) {
  for (const Shape& shape : {Shape{1, 1, 1, 64}, Shape{2, 37, 3, 128}, Shape{1, 300, 4, 64}}) {
    const int64_t b = shape[0], t = shape[1], h = shape[2];
    const Tensor acc = ::tandem::testing::RandomUniform(shape, 1);
    const Tensor blk = RandomBf16Exact(shape, 2);
    Tensor la = ::tandem::testing::RandomUniform({b, h, t}, 3, -4.0f, 4.0f);
    const Tensor lb = ::tandem::testing::RandomUniform({b, h, t}, 4, -4.0f, 4.0f);
    la.data<float>()[0] = -INFINITY;  // a row nothing was merged into yet
    Tensor cacc = testing::Clone(acc), cla = testing::Clone(la);
    ASSERT_TRUE(AttentionMerge(*cpu_, cacc, cla, blk, lb).ok());
    Tensor gacc = Up(acc, DType::kF32), gla = Up(la, DType::kF32);
    ASSERT_TRUE(AttentionMerge(*gpu_, gacc, gla, Up(blk), Up(lb, DType::kF32)).ok());
    EXPECT_TRUE(Matches(Down(gacc), cacc, kF32Merge)) << ShapeToString(shape);
    EXPECT_TRUE(Matches(Down(gla), cla, kF32Merge)) << ShapeToString(shape);
  }
}

TEST_F(RingGpuTest, ChunksFromBlocksMatchWholeSequenceOnCpuAndAreDeterministic) {
  struct Sizes {
    int64_t b, t, hq, hkv, d;
  };
  uint64_t seed = 100;
  for (const Sizes& s : {Sizes{1, 2, 3, 1, 64}, Sizes{2, 34, 3, 1, 64}, Sizes{1, 254, 6, 2, 128},
                         Sizes{2, 600, 4, 4, 64}}) {
    SCOPED_TRACE(::testing::Message() << "B=" << s.b << " T=" << s.t << " Hq=" << s.hq
                                      << " Hkv=" << s.hkv << " D=" << s.d);
    const Tensor q = RandomBf16Exact({s.b, s.t, s.hq, s.d}, seed += 10, -2.0f, 2.0f);
    const Tensor k = RandomBf16Exact({s.b, s.t, s.hkv, s.d}, seed + 1, -2.0f, 2.0f);
    const Tensor v = RandomBf16Exact({s.b, s.t, s.hkv, s.d}, seed + 2);
    const Tensor dout = RandomBf16Exact({s.b, s.t, s.hq, s.d}, seed + 3);
    const float scale = 1.0f / std::sqrt(static_cast<float>(s.d));
    Tensor out = Tensor::Cpu(q.shape(), DType::kF32),
           lse = Tensor::Cpu({s.b, s.hq, s.t}, DType::kF32);
    ASSERT_TRUE(AttentionForward(*cpu_, out, lse, q, k, v, scale).ok());
    Tensor dq = Tensor::Cpu(q.shape(), DType::kF32), dk = Tensor::Cpu(k.shape(), DType::kF32),
           dv = Tensor::Cpu(k.shape(), DType::kF32);
    ASSERT_TRUE(AttentionBackward(*cpu_, dq, dk, dv, dout, q, k, v, out, lse, scale).ok());
    auto run = [&] {
      auto r = testing::ChunkedAttention(*gpu_, Up(q), Up(k), Up(v), Up(dout), scale);
      TANDEM_CHECK_OK(r.status());
      return std::vector<Tensor>{Down(r->out), Down(r->lse), Down(r->dq), Down(r->dk), Down(r->dv)};
    };
    const std::vector<Tensor> got = run(), again = run();
    EXPECT_TRUE(Matches(got[0], out, kBf16Attn)) << "out";
    EXPECT_TRUE(Matches(got[1], lse, kF32Lse)) << "lse";
    EXPECT_TRUE(Matches(got[2], dq, kBf16Attn)) << "dq";
    EXPECT_TRUE(Matches(got[3], dk, kBf16Attn)) << "dk";
    EXPECT_TRUE(Matches(got[4], dv, kBf16Attn)) << "dv";
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_TRUE(testing::BitwiseEqual(got[i], again[i])) << "output " << i;
    }
  }
}

TEST_F(RingGpuTest, ChunkMajorMovesAreExactOnDevice) {
  const Tensor buffer = RandomBf16Exact({2, 6, 4, 64}, 9);
  Tensor g_buffer = Up(buffer);
  const Tensor x = g_buffer.Slice(2, 1, 3);  // token stride 4 * 64
  Tensor chunked = GpuEmpty({3, 2, 2, 2, 64}, DType::kBF16);
  ASSERT_TRUE(ToChunkMajor(*gpu_, chunked, x).ok());
  Tensor c_chunked = Tensor::Cpu({3, 2, 2, 2, 64}, DType::kF32);
  ASSERT_TRUE(ToChunkMajor(*cpu_, c_chunked, buffer.Slice(2, 1, 3)).ok());
  EXPECT_TRUE(::tandem::testing::AllClose(Down(chunked), c_chunked, {0, 0}));
  Tensor g_back = Up(Tensor::CpuZeros({2, 6, 4, 64}, DType::kF32));
  Tensor back = g_back.Slice(2, 1, 3);
  ASSERT_TRUE(FromChunkMajor(*gpu_, back, chunked).ok());
  const Tensor host_back = Down(g_back);
  EXPECT_TRUE(::tandem::testing::AllClose(testing::Clone(host_back.Slice(2, 1, 3)),
                                          testing::Clone(buffer.Slice(2, 1, 3)), {0, 0}));
  EXPECT_EQ(host_back.data<float>()[0], 0.0f);  // head 0 untouched
}

}  // namespace
}  // namespace tandem::ops

namespace tandem::parallel {
namespace {

// A communicator over device tensors for tests on one GPU: SendRecv waits for the rank's
// context, stages through host copies and a thread-group communicator, and copies back. Host
// semantics (each call completes before returning, stream() == nullptr). Only SendRecv, Barrier
// and the accessors are implemented.
class HostStagedComm : public collectives::Communicator {
 public:
  // Neither is owned; both outlive this communicator.
  HostStagedComm(collectives::Communicator& host, ops::Context& ctx) : host_(&host), ctx_(ctx) {}
  int rank() const override { return host_->rank(); }
  int size() const override { return host_->size(); }
  std::string name() const override { return "cp-staged"; }
  const char* backend() const override { return "test-staged"; }
  Device device() const override { return ctx_.device(); }
  int WorldRank(int r) const override { return host_->WorldRank(r); }
  Status SendRecv(const Tensor& send, int dst, Tensor& recv, int src, int tag) override {
    TANDEM_RETURN_IF_ERROR(ctx_.Synchronize());
    TANDEM_ASSIGN_OR_RETURN(Tensor host_send, CopyToHostBlocking(send));
    Tensor host_recv = Tensor::Cpu(recv.shape(), recv.dtype());
    TANDEM_RETURN_IF_ERROR(host_->SendRecv(host_send, dst, host_recv, src, tag));
    TANDEM_RETURN_IF_ERROR(CopyTensor(recv, host_recv, ctx_.stream()));
    return ctx_.Synchronize();
  }
  Status Barrier() override { return host_->Barrier(); }
  Status Synchronize() override { return Status::Ok(); }
  Status Abort(std::string reason) override { return host_->Abort(std::move(reason)); }
  Status Close() override { return host_->Close(); }
  Status AllReduce(Tensor&, collectives::ReduceOp) override { return No("AllReduce"); }
  Status ReduceScatter(Tensor&, const Tensor&, collectives::ReduceOp) override {
    return No("ReduceScatter");
  }
  Status AllGather(Tensor&, const Tensor&) override { return No("AllGather"); }
  Status Broadcast(Tensor&, int) override { return No("Broadcast"); }
  Status Send(const Tensor&, int, int) override { return No("Send"); }
  Status Recv(Tensor&, int, int) override { return No("Recv"); }
  StatusOr<std::unique_ptr<Communicator>> Split(int, int, std::string) override {
    return No("Split");
  }

 private:
  static Status No(const char* what) {
    return UnimplementedError(StrCat("HostStagedComm: ", what, " is not implemented"));
  }
  collectives::Communicator* host_;
  ops::Context& ctx_;
};

// bf16-exact host values.
Tensor RandomBf16(const Shape& shape, uint64_t seed, float lo = -1, float hi = 1) {
  Tensor t = ::tandem::testing::RandomUniform(shape, seed, lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = RoundToBf16(t.data<float>()[i]);
  return t;
}

// One rank: its zig-zag share to the GPU, ring forward and backward, results placed (as f32)
// into the global host tensors at its positions.
Status RunGpuRank(collectives::Communicator& host_comm, const std::vector<Tensor>& in, float scale,
                  std::vector<Tensor>& global_out) {
  TANDEM_ASSIGN_OR_RETURN(std::unique_ptr<ops::Context> ctx, ops::Context::Cuda(0));
  const int n = host_comm.size(), rank = host_comm.rank();
  HostStagedComm cp(host_comm, *ctx);
  std::vector<Tensor> dev;  // q, k, v, dout on the GPU, bf16
  for (const Tensor& g : in) {
    TANDEM_ASSIGN_OR_RETURN(Tensor local, ZigZagLocal(g, n, rank));
    TANDEM_ASSIGN_OR_RETURN(Tensor typed, CastCpu(local, DType::kBF16));
    TANDEM_ASSIGN_OR_RETURN(Tensor d, CopyToDeviceBlocking(typed, ctx->allocator()));
    dev.push_back(d);
  }
  const Tensor &q = dev[0], &k = dev[1], &v = dev[2], &dout = dev[3];
  auto empty = [&](const Shape& shape, DType dt) {
    return Tensor::Empty(shape, dt, ctx->allocator());
  };
  TANDEM_ASSIGN_OR_RETURN(Tensor out, empty(q.shape(), DType::kBF16));
  TANDEM_ASSIGN_OR_RETURN(Tensor lse, empty({q.dim(0), q.dim(2), q.dim(1)}, DType::kF32));
  TANDEM_ASSIGN_OR_RETURN(Tensor dq, empty(q.shape(), DType::kBF16));
  TANDEM_ASSIGN_OR_RETURN(Tensor dk, empty(k.shape(), DType::kBF16));
  TANDEM_ASSIGN_OR_RETURN(Tensor dv, empty(v.shape(), DType::kBF16));
  Status st = RingAttentionForward(*ctx, cp, out, lse, q, k, v, scale);
  if (st.ok()) st = RingAttentionBackward(*ctx, cp, dq, dk, dv, dout, q, k, v, out, lse, scale);
  if (st.ok()) st = ctx->Synchronize();
  const Tensor* results[] = {&out, &lse, &dq, &dk, &dv};
  for (int i = 0; i < 5 && st.ok(); ++i) {
    StatusOr<Tensor> host = CopyToHostBlocking(*results[i]);
    if (!host.ok()) return host.status();
    StatusOr<Tensor> f32 = host->dtype() == DType::kF32 ? *host : CastCpu(*host, DType::kF32);
    if (!f32.ok()) return f32.status();
    st = ZigZagPlace(global_out[i], *f32, n, rank, i == 1 ? 2 : 1);
  }
  return st;
}

TEST(RingAttentionGpu, RingOnOneGpuMatchesCpuWholeSequence) {
  TANDEM_SKIP_WITHOUT_GPU();
  struct Case {
    int cp;
    int64_t b, t, hq, hkv, d;
  };
  auto cpu = ops::Context::Cpu();
  for (const Case& c : {Case{2, 2, 4 * 37, 6, 2, 64}, Case{3, 1, 6 * 45, 4, 4, 128}}) {
    SCOPED_TRACE(::testing::Message() << "cp=" << c.cp << " B=" << c.b << " T=" << c.t
                                      << " Hq=" << c.hq << " Hkv=" << c.hkv << " D=" << c.d);
    const std::vector<Tensor> in = {RandomBf16({c.b, c.t, c.hq, c.d}, 1, -2.0f, 2.0f),
                                    RandomBf16({c.b, c.t, c.hkv, c.d}, 2, -2.0f, 2.0f),
                                    RandomBf16({c.b, c.t, c.hkv, c.d}, 3),
                                    RandomBf16({c.b, c.t, c.hq, c.d}, 4)};
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.d));
    std::vector<Tensor> want = {
        Tensor::Cpu(in[0].shape(), DType::kF32), Tensor::Cpu({c.b, c.hq, c.t}, DType::kF32),
        Tensor::Cpu(in[0].shape(), DType::kF32), Tensor::Cpu(in[1].shape(), DType::kF32),
        Tensor::Cpu(in[1].shape(), DType::kF32)};
    ASSERT_TRUE(ops::AttentionForward(*cpu, want[0], want[1], in[0], in[1], in[2], scale).ok());
    ASSERT_TRUE(ops::AttentionBackward(*cpu, want[2], want[3], want[4], in[3], in[0], in[1], in[2],
                                       want[0], want[1], scale)
                    .ok());
    std::vector<Tensor> got;
    for (const Tensor& w : want) got.push_back(Tensor::CpuZeros(w.shape(), DType::kF32));
    auto comms = collectives::CreateThreadGroup(c.cp, {.timeout_s = 60});
    std::vector<Status> st(c.cp);
    std::vector<std::thread> threads;
    for (int r = 0; r < c.cp; ++r) {
      threads.emplace_back([&, r] { st[r] = RunGpuRank(*comms[r], in, scale, got); });
    }
    for (auto& t : threads) t.join();
    for (const Status& s : st) ASSERT_TRUE(s.ok()) << s.ToString();
    const char* names[] = {"out", "lse", "dq", "dk", "dv"};
    for (int i = 0; i < 5; ++i) {
      EXPECT_TRUE(ops::Matches(got[i], want[i], i == 1 ? ops::kF32Lse : ops::kBf16Attn))
          << names[i];
    }
  }
}

}  // namespace
}  // namespace tandem::parallel
