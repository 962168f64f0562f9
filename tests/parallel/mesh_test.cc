// Mesh arithmetic and groups; the parity harness and failure handling on in-process thread
// groups (no mpirun): tp2 and cp2 (ring and all-gather attention) against one rank, and a rank
// that stops answering mid-step named by the others within the timeout.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "collectives/thread_group.h"
#include "tests/parallel/parallel_test_util.h"

namespace tandem::parallel {
namespace {

using collectives::Communicator;

TEST(Mesh, ResolvesDpAndRejectsBadProducts) {
  auto s = ResolveMesh(8, 0, 2, 2);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(s->dp, 2);
  EXPECT_EQ(s->ToString(), "dp2 x cp2 x tp2");
  auto bad = ResolveMesh(6, 0, 1, 4);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("world size 6 is not a multiple"), std::string::npos)
      << bad.status().message();
  auto wrong = ResolveMesh(4, 2, 1, 4);
  ASSERT_FALSE(wrong.ok());
  EXPECT_NE(wrong.status().message().find("2 * 1 * 4 = 8 but the job has 4 ranks"),
            std::string::npos)
      << wrong.status().message();
  EXPECT_FALSE(ResolveMesh(4, 1, 0, 4).ok());
}

TEST(Mesh, TpIsInnermostThenCpThenDp) {
  const MeshShape s{2, 3, 2};
  for (int r = 0; r < s.world(); ++r) {
    const MeshCoords c = CoordsOf(s, r);
    EXPECT_EQ(r, (c.dp * s.cp + c.cp) * s.tp + c.tp);
    EXPECT_EQ(RankOf(s, c), r);
  }
  EXPECT_EQ(CoordsOf(s, 7).dp, 1);
  EXPECT_EQ(CoordsOf(s, 7).cp, 0);
  EXPECT_EQ(CoordsOf(s, 7).tp, 1);
}

// Runs fn(rank, world) on `n` threads of one thread group.
template <class Fn>
void OnThreads(int n, double timeout_s, Fn fn,
               const std::vector<collectives::InjectedFault>& faults = {}) {
  auto comms = collectives::CreateThreadGroup(n, {.timeout_s = timeout_s}, faults);
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) threads.emplace_back([&, r] { fn(r, *comms[r]); });
  for (std::thread& t : threads) t.join();
}

TEST(Mesh, GroupsHoldTheRightRanks) {
  const MeshShape s{2, 2, 2};
  std::vector<std::vector<int>> seen(8);
  OnThreads(8, 10, [&](int r, Communicator& world) {
    auto g = CreateMeshGroups(world, s);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    // The world rank of every member of each group, in group order.
    for (Communicator* c : {g->tp.get(), g->cp.get(), g->dp.get(), g->dp_cp.get()}) {
      for (int i = 0; i < c->size(); ++i) seen[r].push_back(c->WorldRank(i));
    }
    EXPECT_TRUE(g->Close().ok());
  });
  // rank 5 = (d1, c0, t1): tp {4, 5}, cp {5, 7}, dp {1, 5}, dp_cp {1, 3, 5, 7}.
  EXPECT_EQ(seen[5], (std::vector<int>{4, 5, 5, 7, 1, 5, 1, 3, 5, 7}));
}

void ThreadParity(const MeshShape& shape, bool zero, CpAttention attention) {
  const testing::StepOptions so;
  const testing::RunResult ref = testing::ReferenceRun(false, so);
  std::vector<StatusOr<testing::RunResult>> got(shape.world(), InternalError("not run"));
  OnThreads(shape.world(), 20, [&](int r, Communicator& world) {
    got[r] = testing::MeshRun(world, shape, false, zero, so, attention);
  });
  for (int r = 0; r < shape.world(); ++r) {
    ASSERT_TRUE(got[r].ok()) << "rank " << r << ": " << got[r].status().ToString();
    testing::ExpectMatches(*got[r], ref, !zero);
  }
}

TEST(ThreadMesh, Tp2MatchesOneRank) { ThreadParity({1, 1, 2}, false, CpAttention::kRing); }
TEST(ThreadMesh, Cp2RingMatchesOneRank) { ThreadParity({1, 2, 1}, false, CpAttention::kRing); }
TEST(ThreadMesh, Cp2GatherMatchesOneRank) { ThreadParity({1, 2, 1}, false, CpAttention::kGather); }
TEST(ThreadMesh, Dp2Zero1MatchesOneRank) { ThreadParity({2, 1, 1}, true, CpAttention::kRing); }

// Logits under tp2 (vocabulary slices gathered, padding dropped) equal one rank's.
TEST(ThreadMesh, Tp2LogitsMatchOneRank) {
  auto ctx = ops::Context::Cpu();
  auto ref_model = model::LlamaModel::Create(*ctx, testing::SmallConfig(true), {});
  ASSERT_TRUE(ref_model.ok());
  ASSERT_TRUE((*ref_model)->InitRandom(testing::kInitSeed, testing::kInitStd).ok());
  const testing::GlobalBatch g = testing::MakeBatch(1, 301);
  model::Batch b;
  b.tokens = g.tokens;
  auto want = (*ref_model)->Logits(b);
  ASSERT_TRUE(want.ok()) << want.status().ToString();
  std::vector<StatusOr<Tensor>> got(2, InternalError("not run"));
  OnThreads(2, 20, [&](int r, Communicator& world) {
    auto groups = CreateMeshGroups(world, {1, 1, 2});
    if (!groups.ok()) return void(got[r] = groups.status());
    auto c = ops::Context::Cpu();
    MeshModelHooks hooks(*c, groups->tp.get(), nullptr);
    model::ModelOptions mo;
    mo.parallel = {groups->coords.tp, 2, 0, 1, &hooks};
    mo.loss_chunk_tokens = 24;  // several chunks
    auto m = model::LlamaModel::Create(*c, testing::SmallConfig(true), mo);
    if (!m.ok()) return void(got[r] = m.status());
    Status s = (*m)->InitRandom(testing::kInitSeed, testing::kInitStd);
    got[r] = s.ok() ? (*m)->Logits(b) : StatusOr<Tensor>(s);
  });
  for (int r = 0; r < 2; ++r) {
    ASSERT_TRUE(got[r].ok()) << got[r].status().ToString();
    EXPECT_TRUE(tandem::testing::AllClose(*got[r], *want, {1e-5, 1e-5})) << "rank " << r;
  }
}

// Rank 1 stops answering at its 12th collective (inside the first forward pass); rank 0 fails
// within the timeout with an error that names rank 1.
TEST(ThreadMesh, ARankThatStopsIsNamedWithinTheTimeout) {
  const double timeout_s = 1.0;
  std::vector<Status> st(2, InternalError("not run"));
  std::vector<double> seconds(2);
  OnThreads(2, timeout_s,
            [&](int r, Communicator& world) {
              const auto t0 = std::chrono::steady_clock::now();
              st[r] = testing::MeshRun(world, {1, 1, 2}, false, false, {}).status();
              seconds[r] =
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            },
            {{.rank = 1, .at_call = 12}});
  EXPECT_EQ(st[0].code(), StatusCode::kDeadlineExceeded) << st[0].ToString();
  EXPECT_NE(st[0].message().find("rank 1"), std::string::npos) << st[0].message();
  EXPECT_LT(seconds[0], timeout_s + 5.0);
  EXPECT_FALSE(st[1].ok());
}

}  // namespace
}  // namespace tandem::parallel
