// The in-process thread group: every collective against plain references (bitwise, since the
// group reduces in rank order), Split into a 2x2 mesh, point to point, timeouts naming the
// missing rank, injected faults, mismatched calls, Abort.
#include "collectives/thread_group.h"

#include <gtest/gtest.h>

#include <thread>

#include "tests/collectives/collectives_test_util.h"

namespace tandem::collectives {
namespace {

using testing::RankInput;
using testing::SecondsSince;

template <typename Fn>
void RunRanks(std::vector<std::unique_ptr<Communicator>>& comms, Fn fn) {
  std::vector<std::thread> threads;
  for (int r = 0; r < static_cast<int>(comms.size()); ++r) {
    threads.emplace_back([&, r] { fn(r, *comms[r]); });
  }
  for (auto& t : threads) t.join();
}

// The documented order: ((x0 op x1) op x2) ..., f32 accumulation for bf16/f16, rounded once.
Tensor RankOrderReduce(const std::vector<Tensor>& in, int64_t offset, int64_t n, ReduceOp op) {
  const DType dt = in[0].dtype();
  Tensor out = Tensor::Cpu({n}, dt);
  for (int64_t i = 0; i < n; ++i) {
    if (IsFloating(dt)) {
      float acc = static_cast<float>(testing::Load(in[0], offset + i));
      for (size_t r = 1; r < in.size(); ++r) {
        const float x = static_cast<float>(testing::Load(in[r], offset + i));
        acc = op == ReduceOp::kMax   ? std::max(acc, x)
              : op == ReduceOp::kMin ? std::min(acc, x)
                                     : acc + x;
      }
      if (op == ReduceOp::kAvg) acc /= static_cast<float>(in.size());
      if (dt == DType::kF32) out.data<float>()[i] = acc;
      if (dt == DType::kBF16) out.data<Bf16>()[i] = FloatToBf16(acc);
      if (dt == DType::kF16) out.data<F16>()[i] = FloatToF16(acc);
    } else {
      int64_t acc = static_cast<int64_t>(testing::Load(in[0], offset + i));
      for (size_t r = 1; r < in.size(); ++r) {
        const int64_t x = static_cast<int64_t>(testing::Load(in[r], offset + i));
        acc = op == ReduceOp::kMax   ? std::max(acc, x)
              : op == ReduceOp::kMin ? std::min(acc, x)
                                     : acc + x;
      }
      if (dt == DType::kI32) out.data<int32_t>()[i] = static_cast<int32_t>(acc);
      if (dt == DType::kI64) out.data<int64_t>()[i] = acc;
      if (dt == DType::kU8) out.data<uint8_t>()[i] = static_cast<uint8_t>(acc & 0xff);
    }
  }
  return out;
}

std::vector<Tensor> Inputs(DType dt, int64_t n, uint64_t seed, int size) {
  std::vector<Tensor> in;
  for (int r = 0; r < size; ++r) in.push_back(RankInput(dt, n, seed, r));
  return in;
}

struct Case {
  int size;
  DType dtype;
  int64_t n;
  ReduceOp op;
};

std::string Name(const Case& c) {
  return StrCat(c.size, " ranks, ", DTypeName(c.dtype), "[", c.n, "], ", ReduceOpName(c.op));
}

std::vector<Case> MainCases() {
  std::vector<Case> cases;
  for (int size : {2, 4})
    for (DType dt : testing::MainDTypes())
      for (int64_t n : testing::OddSizes()) cases.push_back({size, dt, n, ReduceOp::kSum});
  // The other ops and dtypes on a mid size.
  for (ReduceOp op : {ReduceOp::kMax, ReduceOp::kMin, ReduceOp::kAvg}) {
    cases.push_back({3, DType::kF32, 1001, op});
    cases.push_back({4, DType::kBF16, 1001, op});
    if (op != ReduceOp::kAvg) cases.push_back({3, DType::kI32, 1001, op});
  }
  cases.push_back({4, DType::kF16, 1001, ReduceOp::kSum});
  cases.push_back({4, DType::kI64, 1001, ReduceOp::kSum});
  cases.push_back({3, DType::kU8, 1001, ReduceOp::kSum});  // wraps around
  return cases;
}

TEST(ThreadGroup, AllReduceIsTheRankOrderReductionBitwise) {
  for (const Case& c : MainCases()) {
    SCOPED_TRACE(Name(c));
    auto comms = CreateThreadGroup(c.size, {.timeout_s = 30});
    const std::vector<Tensor> in = Inputs(c.dtype, c.n, 1, c.size);
    const Tensor expected = RankOrderReduce(in, 0, c.n, c.op);
    const std::vector<double> exact = testing::ReferenceReduce(in, 0, c.n, c.op);
    RunRanks(comms, [&](int r, Communicator& comm) {
      Tensor x = *CastCpu(in[r], c.dtype);  // a private copy, reduced in place
      ASSERT_TRUE(comm.AllReduce(x, c.op).ok());
      EXPECT_TRUE(testing::SameBytes(x, expected)) << "rank " << r;
      EXPECT_TRUE(testing::MatchesValues(x, exact, testing::ReduceTolerance(c.dtype, c.size)));
    });
  }
}

TEST(ThreadGroup, ReduceScatterGivesEachRankItsChunk) {
  for (const Case& c : MainCases()) {
    SCOPED_TRACE(Name(c));
    auto comms = CreateThreadGroup(c.size, {.timeout_s = 30});
    const std::vector<Tensor> in = Inputs(c.dtype, c.n * c.size, 2, c.size);
    RunRanks(comms, [&](int r, Communicator& comm) {
      Tensor out = Tensor::Cpu({c.n}, c.dtype);
      ASSERT_TRUE(comm.ReduceScatter(out, in[r], c.op).ok());
      EXPECT_TRUE(testing::SameBytes(out, RankOrderReduce(in, r * c.n, c.n, c.op))) << "rank " << r;
    });
  }
}

TEST(ThreadGroup, AllGatherConcatenatesInRankOrderAlsoInPlace) {
  for (int size : {2, 4}) {
    for (DType dt : testing::MainDTypes()) {
      for (int64_t n : testing::OddSizes()) {
        SCOPED_TRACE(StrCat(size, " ranks, ", DTypeName(dt), "[", n, "]"));
        auto comms = CreateThreadGroup(size, {.timeout_s = 30});
        const std::vector<Tensor> in = Inputs(dt, n, 3, size);
        RunRanks(comms, [&](int r, Communicator& comm) {
          Tensor out = Tensor::Cpu({size * n}, dt);
          ASSERT_TRUE(comm.AllGather(out, in[r]).ok());
          Tensor in_place = Tensor::Cpu({size * n}, dt);
          Tensor mine = in_place.Slice(0, r * n, (r + 1) * n);
          std::memcpy(mine.raw_data(), in[r].raw_data(), in[r].num_bytes());
          ASSERT_TRUE(comm.AllGather(in_place, mine).ok());
          for (int q = 0; q < size; ++q) {
            EXPECT_EQ(std::memcmp(static_cast<char*>(out.raw_data()) + q * in[q].num_bytes(),
                                  in[q].raw_data(), in[q].num_bytes()),
                      0)
                << "chunk " << q;
          }
          EXPECT_TRUE(testing::SameBytes(out, in_place));
        });
      }
    }
  }
}

TEST(ThreadGroup, BroadcastFromEveryRoot) {
  const int size = 4;
  auto comms = CreateThreadGroup(size, {.timeout_s = 30});
  for (int root = 0; root < size; ++root) {
    const std::vector<Tensor> in = Inputs(DType::kBF16, 1001, 10 + root, size);
    RunRanks(comms, [&](int r, Communicator& comm) {
      Tensor x = *CastCpu(in[r], DType::kBF16);
      ASSERT_TRUE(comm.Broadcast(x, root).ok());
      EXPECT_TRUE(testing::SameBytes(x, in[root])) << "rank " << r << " root " << root;
    });
  }
}

TEST(ThreadGroup, SplitIntoRowsAndColumnsOfA2x2Mesh) {
  auto comms = CreateThreadGroup(4, {.timeout_s = 30});
  RunRanks(comms, [&](int r, Communicator& world) {
    // Mesh [row, col] = [r / 2, r % 2]; rows are "tp" groups, columns "dp" groups.
    auto row = world.Split(r / 2, r, "tp");
    auto col = world.Split(r % 2, r, "dp");
    ASSERT_TRUE(row.ok() && col.ok());
    Communicator& tp = **row;
    Communicator& dp = **col;
    EXPECT_EQ(tp.name(), "tp");
    EXPECT_EQ(dp.name(), "dp");
    EXPECT_EQ(tp.size(), 2);
    EXPECT_EQ(tp.rank(), r % 2);
    EXPECT_EQ(dp.rank(), r / 2);
    for (int q = 0; q < 2; ++q) {
      EXPECT_EQ(tp.WorldRank(q), (r / 2) * 2 + q);
      EXPECT_EQ(dp.WorldRank(q), q * 2 + r % 2);
    }
    Tensor a = Tensor::Cpu({1}, DType::kI32);
    a.data<int32_t>()[0] = 1 << r;
    Tensor b = *CastCpu(a, DType::kI32);
    ASSERT_TRUE(tp.AllReduce(a, ReduceOp::kSum).ok());
    ASSERT_TRUE(dp.AllReduce(b, ReduceOp::kSum).ok());
    EXPECT_EQ(a.data<int32_t>()[0], (r / 2 == 0) ? 0b0011 : 0b1100);
    EXPECT_EQ(b.data<int32_t>()[0], (r % 2 == 0) ? 0b0101 : 0b1010);
    // Reversed keys reverse the order; kNoColor leaves a rank out.
    auto rev = world.Split(r == 0 ? kNoColor : 7, -r, "rest");
    ASSERT_TRUE(rev.ok());
    if (r == 0) {
      EXPECT_EQ(rev->get(), nullptr);
    } else {
      EXPECT_EQ((*rev)->size(), 3);
      EXPECT_EQ((*rev)->rank(), 3 - r);
      EXPECT_TRUE((*rev)->Barrier().ok());
    }
  });
}

TEST(ThreadGroup, SendRecvRingAndOrderedSendRecv) {
  for (int size : {2, 4}) {
    auto comms = CreateThreadGroup(size, {.timeout_s = 30});
    const std::vector<Tensor> in = Inputs(DType::kF32, 1000003, 4, size);
    RunRanks(comms, [&](int r, Communicator& comm) {
      const int next = (r + 1) % size, prev = (r + size - 1) % size;
      Tensor got = Tensor::Cpu({1000003}, DType::kF32);
      ASSERT_TRUE(comm.SendRecv(in[r], next, got, prev, 5).ok());
      EXPECT_TRUE(testing::SameBytes(got, in[prev])) << "rank " << r;
      // The same ring with blocking Send/Recv: even ranks send first, odd ranks receive first.
      Tensor got2 = Tensor::Cpu({3}, DType::kI32);
      const Tensor mine = RankInput(DType::kI32, 3, 5, r);
      if (r % 2 == 0) {
        ASSERT_TRUE(comm.Send(mine, next, 1).ok());
        ASSERT_TRUE(comm.Recv(got2, prev, 1).ok());
      } else {
        ASSERT_TRUE(comm.Recv(got2, prev, 1).ok());
        ASSERT_TRUE(comm.Send(mine, next, 1).ok());
      }
      EXPECT_TRUE(testing::SameBytes(got2, RankInput(DType::kI32, 3, 5, prev)));
    });
  }
}

TEST(ThreadGroup, TimeoutNamesTheRankThatDidNotArrive) {
  auto comms = CreateThreadGroup(4, {.timeout_s = 0.5});
  RunRanks(comms, [&](int r, Communicator& comm) {
    Tensor x = RankInput(DType::kF32, 1000, 6, r);
    if (r == 3) return;  // never arrives
    const auto t0 = std::chrono::steady_clock::now();
    const Status s = comm.AllReduce(x, ReduceOp::kSum);
    const double took = SecondsSince(t0);
    EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
    EXPECT_NE(s.message().find("group 'world'"), std::string::npos) << s.message();
    EXPECT_NE(s.message().find("AllReduce #1"), std::string::npos) << s.message();
    EXPECT_NE(s.message().find("rank 3 did not arrive"), std::string::npos) << s.message();
    EXPECT_LT(took, 2.0);
    // Broken for good: the next call fails at once.
    const auto t1 = std::chrono::steady_clock::now();
    EXPECT_EQ(comm.Barrier().code(), StatusCode::kDeadlineExceeded);
    EXPECT_LT(SecondsSince(t1), 0.1);
  });
  EXPECT_FALSE(comms[3]->Barrier().ok());  // the late rank finds the group broken
}

TEST(ThreadGroup, PointToPointTimeoutNamesThePeer) {
  auto comms = CreateThreadGroup(2, {.timeout_s = 0.3});
  RunRanks(comms, [&](int r, Communicator& comm) {
    if (r == 1) return;
    const Status s = comm.Send(RankInput(DType::kF32, 3, 7, r), 1, 9);
    EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
    EXPECT_NE(s.message().find("to rank 1"), std::string::npos) << s.message();
  });
}

TEST(ThreadGroup, InjectedDeathIsNamedAlsoInSplitGroups) {
  // World rank 2 dies at its call #1: call #0 is the Split, call #1 the AllReduce in "dp".
  auto comms = CreateThreadGroup(4, {.timeout_s = 0.5}, {{.rank = 2, .at_call = 1}});
  RunRanks(comms, [&](int r, Communicator& world) {
    auto dp = world.Split(r % 2, r, "dp");  // dp groups {0, 2} and {1, 3}
    ASSERT_TRUE(dp.ok());
    Tensor x = RankInput(DType::kF32, 10, 8, r);
    const Status s = (*dp)->AllReduce(x, ReduceOp::kSum);
    if (r == 2) {
      EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
    } else if (r == 0) {
      EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
      EXPECT_NE(s.message().find("group 'dp'"), std::string::npos) << s.message();
      EXPECT_NE(s.message().find("rank 1 (world 2) did not arrive"), std::string::npos)
          << s.message();
    } else {
      EXPECT_TRUE(s.ok()) << s.ToString();  // the other dp group is unaffected
    }
    if (r == 2) {
      EXPECT_EQ(world.Barrier().code(), StatusCode::kUnavailable);  // dead for good
    }
  });
}

TEST(ThreadGroup, InjectedDelayWithinTheTimeoutSucceeds) {
  auto comms = CreateThreadGroup(
      3, {.timeout_s = 5},
      {{.rank = 1, .at_call = 0, .kind = InjectedFault::Kind::kDelay, .delay_s = 0.2}});
  RunRanks(comms, [&](int r, Communicator& comm) {
    const auto t0 = std::chrono::steady_clock::now();
    EXPECT_TRUE(comm.Barrier().ok());
    EXPECT_GE(SecondsSince(t0), 0.19);
  });
}

TEST(ThreadGroup, MismatchedCallsFailOnEveryRankNamingEachCall) {
  auto comms = CreateThreadGroup(2, {.timeout_s = 5});
  RunRanks(comms, [&](int r, Communicator& comm) {
    Tensor x = RankInput(DType::kF32, r == 0 ? 3 : 4, 9, r);
    const Status s = comm.AllReduce(x, ReduceOp::kSum);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
    EXPECT_NE(s.message().find("rank 0: AllReduce(f32[3], sum); rank 1: AllReduce(f32[4], sum)"),
              std::string::npos)
        << s.message();
  });
}

TEST(ThreadGroup, ArgumentErrorsLeaveTheGroupUsable) {
  auto comms = CreateThreadGroup(2, {.timeout_s = 5});
  RunRanks(comms, [&](int r, Communicator& comm) {
    Tensor out = Tensor::Cpu({3}, DType::kF32);
    const Status bad = comm.ReduceScatter(out, Tensor::Cpu({5}, DType::kF32), ReduceOp::kSum);
    EXPECT_EQ(bad.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(bad.message().find("size (2) x 'out' elements = 6"), std::string::npos)
        << bad.message();
    Tensor ints = Tensor::CpuZeros({2}, DType::kI32);
    EXPECT_EQ(comm.AllReduce(ints, ReduceOp::kAvg).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(comm.Send(out, r, 0).code(), StatusCode::kInvalidArgument);  // to itself
    EXPECT_EQ(comm.Broadcast(out, 2).code(), StatusCode::kInvalidArgument);
    EXPECT_TRUE(comm.Barrier().ok());
  });
}

TEST(ThreadGroup, AbortWakesWaitingPeersWithTheReason) {
  auto comms = CreateThreadGroup(4, {.timeout_s = 30});
  RunRanks(comms, [&](int r, Communicator& comm) {
    if (r == 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      EXPECT_TRUE(comm.Abort("bad batch").ok());
      EXPECT_EQ(comm.Barrier().code(), StatusCode::kAborted);
      return;
    }
    const auto t0 = std::chrono::steady_clock::now();
    const Status s = comm.Barrier();
    EXPECT_EQ(s.code(), StatusCode::kAborted) << s.ToString();
    EXPECT_NE(s.message().find("rank 0 aborted the group: bad batch"), std::string::npos)
        << s.message();
    EXPECT_LT(SecondsSince(t0), 5.0);
  });
}

TEST(ThreadGroup, ClosedCommunicatorRefusesCalls) {
  auto comms = CreateThreadGroup(1, {.timeout_s = 1});
  Tensor x = RankInput(DType::kF32, 3, 11, 0);
  EXPECT_TRUE(comms[0]->AllReduce(x, ReduceOp::kSum).ok());  // one rank: identity
  EXPECT_TRUE(testing::SameBytes(x, RankInput(DType::kF32, 3, 11, 0)));
  EXPECT_TRUE(comms[0]->Close().ok());
  EXPECT_EQ(comms[0]->Barrier().code(), StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace tandem::collectives
