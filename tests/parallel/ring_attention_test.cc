// Ring attention on in-process thread groups (cp = 2, 3, 4): out, lse, dq, dk, dv gathered back
// to global order equal ops::AttentionForward/Backward over the whole sequence (f32, kRingF32Tol);
// odd head counts, GQA, odd chunk lengths, views into a fused qkv; cp = 1 is the plain op bit for
// bit; the zig-zag layout and the per-step block table (every rank does equal work and every
// causal chunk pair is computed exactly once); clear errors.
#include <gtest/gtest.h>

#include <map>
#include <thread>
#include <utility>
#include <vector>

#include "collectives/thread_group.h"
#include "tests/parallel/ring_attention_test_util.h"

namespace tandem::parallel {
namespace {

using testing::MakeProblem;
using testing::RingCase;
using testing::RingProblem;
using testing::RingResult;

// Runs `body(rank, comm)` on cp threads and returns each rank's status.
template <typename Body>
std::vector<Status> OnThreads(int cp, const Body& body) {
  auto comms = collectives::CreateThreadGroup(cp, {.timeout_s = 20});
  std::vector<Status> st(cp);
  std::vector<std::thread> threads;
  for (int r = 0; r < cp; ++r) {
    threads.emplace_back([&, r] { st[r] = body(r, *comms[r]); });
  }
  for (auto& t : threads) t.join();
  return st;
}

TEST(ZigZag, IndicesAreChunkRThenMirror) {
  EXPECT_EQ(ZigZagIndices(8, 2, 0), (std::vector<int64_t>{0, 1, 6, 7}));
  EXPECT_EQ(ZigZagIndices(8, 2, 1), (std::vector<int64_t>{2, 3, 4, 5}));
  EXPECT_EQ(ZigZagIndices(12, 3, 1), (std::vector<int64_t>{2, 3, 8, 9}));
  EXPECT_EQ(ZigZagIndices(6, 1, 0), (std::vector<int64_t>{0, 1, 2, 3, 4, 5}));
  for (int cp : {1, 2, 3, 4}) {  // every position held by exactly one rank
    std::vector<int> seen(2 * cp * 5, 0);
    for (int r = 0; r < cp; ++r) {
      for (int64_t i : ZigZagIndices(2 * cp * 5, cp, r)) ++seen[i];
    }
    for (int s : seen) EXPECT_EQ(s, 1);
  }
}

TEST(ZigZag, LocalAndPlaceRoundTrip) {
  const Tensor x = tandem::testing::RandomUniform({2, 12, 3}, 5);
  Tensor back = Tensor::CpuZeros(x.shape(), DType::kF32);
  for (int r = 0; r < 3; ++r) {
    auto local = ZigZagLocal(x, 3, r);
    ASSERT_TRUE(local.ok()) << local.status().ToString();
    ASSERT_EQ(local->shape(), (Shape{2, 4, 3}));
    const std::vector<int64_t> idx = ZigZagIndices(12, 3, r);
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t i = 0; i < 4; ++i)
        for (int64_t c = 0; c < 3; ++c)
          EXPECT_EQ(local->data<float>()[(b * 4 + i) * 3 + c],
                    x.data<float>()[(b * 12 + idx[i]) * 3 + c]);
    ASSERT_TRUE(ZigZagPlace(back, *local, 3, r).ok());
  }
  EXPECT_TRUE(tandem::testing::AllClose(back, x, {0, 0}));
  const Status bad = ZigZagLocal(Tensor::Cpu({1, 10}, DType::kF32), 3, 0).status();
  EXPECT_EQ(bad.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("divisible by 2 * cp = 6"), std::string::npos) << bad.message();
}

// Over all ranks and steps, each global (q chunk, kv chunk) pair with kv <= q is computed exactly
// once, causal iff kv == q; every rank does two chunk pairs of work at every step.
TEST(RingBlocks, CoverTheCausalPairsOnceWithEqualWork) {
  for (int cp : {1, 2, 3, 4, 5}) {
    std::map<std::pair<int, int>, int> count;
    for (int r = 0; r < cp; ++r) {
      for (int s = 0; s < cp; ++s) {
        const int src = ((r - s) % cp + cp) % cp;
        double work = 0;
        for (const RingBlock& b : RingStepBlocks(cp, r, s)) {
          const int qc = b.q_chunk == 0 ? r : 2 * cp - 1 - r;
          const int kc = b.kv_chunk == 0 ? src : 2 * cp - 1 - src;
          ASSERT_LE(kc, qc) << "cp " << cp << " rank " << r << " step " << s;
          EXPECT_EQ(b.mask == ops::AttentionMask::kCausal, kc == qc);
          ++count[{qc, kc}];
          work += b.mask == ops::AttentionMask::kCausal ? 0.5 : 1.0;
        }
        EXPECT_EQ(work, 2.0) << "cp " << cp << " rank " << r << " step " << s;
      }
    }
    EXPECT_EQ(count.size(), static_cast<size_t>(2 * cp * (2 * cp + 1) / 2)) << "cp " << cp;
    for (const auto& [pair, n] : count) EXPECT_EQ(n, 1);
  }
}

TEST(RingAttention, MatchesSingleProcessAttention) {
  struct Case {
    int cp;
    RingCase c;
  };
  // T = 2 * cp * Tc with odd Tc; odd head counts, GQA (3 q heads on 1 kv head), MHA.
  const Case cases[] = {{2, {2, 12, 3, 1, 16}}, {2, {1, 4, 2, 2, 8}},   {3, {2, 18, 3, 3, 16}},
                        {3, {1, 30, 6, 2, 16}}, {4, {2, 24, 3, 1, 16}}, {4, {1, 8, 1, 1, 5}}};
  uint64_t seed = 100;
  for (const Case& k : cases) {
    const RingCase& c = k.c;
    SCOPED_TRACE(::testing::Message() << "cp=" << k.cp << " B=" << c.b << " T=" << c.t
                                      << " Hq=" << c.hq << " Hkv=" << c.hkv << " D=" << c.d);
    const RingProblem p = MakeProblem(c, seed += 10);
    RingResult r = testing::EmptyResult(p);
    const std::vector<Status> st = OnThreads(k.cp, [&](int, collectives::Communicator& comm) {
      return testing::RunRingRank(comm, p, r);
    });
    for (const Status& s : st) ASSERT_TRUE(s.ok()) << s.ToString();
    testing::ExpectMatchesReference(r, p);
  }
}

TEST(RingAttention, IsDeterministic) {
  const RingProblem p = MakeProblem({2, 12, 3, 1, 16}, 7);
  RingResult r1 = testing::EmptyResult(p), r2 = testing::EmptyResult(p);
  for (RingResult* r : {&r1, &r2}) {
    for (const Status& s : OnThreads(3, [&](int, collectives::Communicator& comm) {
           return testing::RunRingRank(comm, p, *r);
         })) {
      ASSERT_TRUE(s.ok()) << s.ToString();
    }
  }
  for (auto [a, b] : {std::pair{&r1.out, &r2.out},
                      {&r1.lse, &r2.lse},
                      {&r1.dq, &r2.dq},
                      {&r1.dk, &r2.dk},
                      {&r1.dv, &r2.dv}}) {
    EXPECT_TRUE(tandem::testing::AllClose(*a, *b, {0, 0}));
  }
}

// q, k, v as views into one fused qkv buffer [B, Tl, (Hq + 2 Hkv) * D] (token stride free), and
// the gradients as views into a fused dqkv, as the model passes them.
TEST(RingAttention, TakesViewsIntoFusedQkv) {
  const RingCase c{2, 12, 3, 1, 8};
  const int cp = 2;
  const RingProblem p = MakeProblem(c, 31);
  RingResult r = testing::EmptyResult(p);
  const int64_t width = (c.hq + 2 * c.hkv) * c.d;
  auto view = [&](const Tensor& fused, int64_t h0, int64_t h) {
    return fused.View({c.b, c.t / cp, c.hq + 2 * c.hkv, c.d}).Slice(2, h0, h0 + h);
  };
  const std::vector<Status> st = OnThreads(cp, [&](int rank, collectives::Communicator& comm) {
    auto ctx = ops::Context::Cpu();
    const int64_t tl = c.t / cp;
    Tensor qkv = Tensor::Cpu({c.b, tl, width}, DType::kF32);
    Tensor dqkv = Tensor::Cpu({c.b, tl, width}, DType::kF32);
    Tensor q = view(qkv, 0, c.hq), k = view(qkv, c.hq, c.hkv), v = view(qkv, c.hq + c.hkv, c.hkv);
    for (auto [dst, src] : {std::pair{&q, &p.q}, {&k, &p.k}, {&v, &p.v}}) {
      TANDEM_ASSIGN_OR_RETURN(Tensor local, ZigZagLocal(*src, cp, rank));
      for (int64_t i = 0; i < local.numel() / c.d; ++i) {  // token-major rows of D
        const int64_t h = i % dst->dim(2), t = (i / dst->dim(2)) % tl, b = i / (dst->dim(2) * tl);
        float* row = dst->data<float>() + b * dst->stride(0) + t * dst->stride(1) + h * c.d;
        std::copy_n(local.data<float>() + i * c.d, c.d, row);
      }
    }
    TANDEM_ASSIGN_OR_RETURN(Tensor dout, ZigZagLocal(p.dout, cp, rank));
    Tensor out = Tensor::Cpu(dout.shape(), DType::kF32);
    Tensor lse = Tensor::Cpu({c.b, c.hq, tl}, DType::kF32);
    TANDEM_RETURN_IF_ERROR(RingAttentionForward(*ctx, comm, out, lse, q, k, v, p.scale));
    Tensor dq = view(dqkv, 0, c.hq), dk = view(dqkv, c.hq, c.hkv);
    Tensor dv = view(dqkv, c.hq + c.hkv, c.hkv);
    TANDEM_RETURN_IF_ERROR(
        RingAttentionBackward(*ctx, comm, dq, dk, dv, dout, q, k, v, out, lse, p.scale));
    TANDEM_RETURN_IF_ERROR(ZigZagPlace(r.out, out, cp, rank));
    // Gather dq through a contiguous copy of the view.
    Tensor dq_local = Tensor::Cpu(dout.shape(), DType::kF32);
    for (int64_t i = 0; i < dq_local.numel() / c.d; ++i) {
      const int64_t h = i % c.hq, t = (i / c.hq) % tl, b = i / (c.hq * tl);
      std::copy_n(dq.data<float>() + b * dq.stride(0) + t * dq.stride(1) + h * c.d, c.d,
                  dq_local.data<float>() + i * c.d);
    }
    return ZigZagPlace(r.dq, dq_local, cp, rank);
  });
  for (const Status& s : st) ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_TRUE(tandem::testing::AllClose(r.out, p.out, testing::kRingF32Tol));
  EXPECT_TRUE(tandem::testing::AllClose(r.dq, p.dq, testing::kRingF32Tol));
}

TEST(RingAttention, SizeOneIsThePlainOpBitForBit) {
  const RingProblem p = MakeProblem({2, 10, 3, 1, 16}, 3);  // T = 2 * 5: odd chunks
  RingResult r = testing::EmptyResult(p);
  for (const Status& s : OnThreads(1, [&](int, collectives::Communicator& comm) {
         return testing::RunRingRank(comm, p, r);
       })) {
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  for (auto [a, b] : {std::pair{&r.out, &p.out},
                      {&r.lse, &p.lse},
                      {&r.dq, &p.dq},
                      {&r.dk, &p.dk},
                      {&r.dv, &p.dv}}) {
    EXPECT_TRUE(tandem::testing::AllClose(*a, *b, {0, 0}));
  }
}

TEST(RingAttention, OddLocalSequenceIsAClearError) {
  const std::vector<Status> st = OnThreads(2, [&](int, collectives::Communicator& comm) {
    auto ctx = ops::Context::Cpu();
    const Tensor q = tandem::testing::RandomUniform({1, 3, 2, 8}, 1);
    Tensor out = Tensor::Cpu(q.shape(), DType::kF32);
    Tensor lse = Tensor::Cpu({1, 2, 3}, DType::kF32);
    return RingAttentionForward(*ctx, comm, out, lse, q, q, q, 0.5f);
  });
  for (const Status& s : st) {
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find("must be divisible by 2 * cp = 4"), std::string::npos)
        << s.message();
  }
}

}  // namespace
}  // namespace tandem::parallel
