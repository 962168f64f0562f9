// mpi-ranks: 2 4
// The MPI backend under mpirun: every collective with f32/bf16/i32 at odd sizes against an f64
// reference (stated tolerances), Split into the rows and columns of a mesh, Send/Recv rings, a
// rank that skips a collective (DeadlineExceeded naming it, no hang), Abort reaching the peers.
#include <gtest/gtest.h>

#include <thread>

#include "collectives/mpi.h"
#include "tests/collectives/collectives_test_util.h"
#include "tests/collectives/mpi_test_main.h"

namespace tandem::collectives {
namespace {

using testing::RankInput;
using testing::SecondsSince;

std::unique_ptr<Communicator> World(double timeout_s = 60) {
  auto world = CreateMpiWorld({.timeout_s = timeout_s});
  TANDEM_CHECK_OK(world.status());
  return std::move(*world);
}

std::vector<Tensor> AllInputs(DType dt, int64_t n, uint64_t seed, int size) {
  std::vector<Tensor> in;
  for (int r = 0; r < size; ++r) in.push_back(RankInput(dt, n, seed, r));
  return in;
}

TEST(MpiCommunicator, WorldMatchesTheRuntime) {
  auto world = World();
  EXPECT_EQ(world->rank(), testing::Mpi().world_rank());
  EXPECT_EQ(world->size(), testing::Mpi().world_size());
  EXPECT_EQ(world->name(), "world");
  EXPECT_STREQ(world->backend(), "mpi");
  for (int r = 0; r < world->size(); ++r) EXPECT_EQ(world->WorldRank(r), r);
  EXPECT_LT(testing::Mpi().local_rank(), testing::Mpi().local_size());
  EXPECT_TRUE(world->Close().ok());
}

TEST(MpiCommunicator, AllReduceEveryDTypeAndOddSize) {
  auto world = World();
  const int size = world->size(), rank = world->rank();
  for (DType dt : testing::MainDTypes()) {
    for (int64_t n : testing::OddSizes()) {
      SCOPED_TRACE(StrCat(DTypeName(dt), "[", n, "]"));
      const std::vector<Tensor> in = AllInputs(dt, n, 1, size);
      Tensor x = *CastCpu(in[rank], dt);
      ASSERT_TRUE(world->AllReduce(x, ReduceOp::kSum).ok());
      EXPECT_TRUE(testing::MatchesValues(x, testing::ReferenceReduce(in, 0, n, ReduceOp::kSum),
                                         testing::ReduceTolerance(dt, size)));
    }
  }
  // The other ops and dtypes.
  struct Extra {
    DType dt;
    ReduceOp op;
  };
  for (Extra e : {Extra{DType::kF32, ReduceOp::kMax}, Extra{DType::kF32, ReduceOp::kMin},
                  Extra{DType::kF32, ReduceOp::kAvg}, Extra{DType::kBF16, ReduceOp::kAvg},
                  Extra{DType::kI32, ReduceOp::kMax}, Extra{DType::kI32, ReduceOp::kMin},
                  Extra{DType::kF16, ReduceOp::kSum}, Extra{DType::kI64, ReduceOp::kSum},
                  Extra{DType::kU8, ReduceOp::kSum}, Extra{DType::kU8, ReduceOp::kMax}}) {
    SCOPED_TRACE(StrCat(DTypeName(e.dt), " ", ReduceOpName(e.op)));
    const std::vector<Tensor> in = AllInputs(e.dt, 1001, 2, size);
    Tensor x = *CastCpu(in[rank], e.dt);
    ASSERT_TRUE(world->AllReduce(x, e.op).ok());
    EXPECT_TRUE(testing::MatchesValues(x, testing::ReferenceReduce(in, 0, 1001, e.op),
                                       testing::ReduceTolerance(e.dt, size)));
  }
  EXPECT_TRUE(world->Close().ok());
}

TEST(MpiCommunicator, ReduceScatterEveryDTypeAndOddSize) {
  auto world = World();
  const int size = world->size(), rank = world->rank();
  for (DType dt : testing::MainDTypes()) {
    for (int64_t n : testing::OddSizes()) {
      SCOPED_TRACE(StrCat(DTypeName(dt), " chunks of ", n));
      // Every rank's chunk `rank` is all the reference needs.
      std::vector<Tensor> chunks;
      for (int q = 0; q < size; ++q) chunks.push_back(RankInput(dt, n, 3, q, rank * n));
      Tensor out = Tensor::Cpu({n}, dt);
      ASSERT_TRUE(world->ReduceScatter(out, RankInput(dt, n * size, 3, rank), ReduceOp::kSum).ok());
      EXPECT_TRUE(testing::MatchesValues(out,
                                         testing::ReferenceReduce(chunks, 0, n, ReduceOp::kSum),
                                         testing::ReduceTolerance(dt, size)));
    }
  }
  EXPECT_TRUE(world->Close().ok());
}

TEST(MpiCommunicator, AllGatherEveryDTypeAndOddSizeAlsoInPlace) {
  auto world = World();
  const int size = world->size(), rank = world->rank();
  for (DType dt : testing::MainDTypes()) {
    for (int64_t n : testing::OddSizes()) {
      SCOPED_TRACE(StrCat(DTypeName(dt), "[", n, "]"));
      const std::vector<Tensor> in = AllInputs(dt, n, 4, size);
      Tensor out = Tensor::Cpu({size * n}, dt);
      ASSERT_TRUE(world->AllGather(out, in[rank]).ok());
      Tensor in_place = Tensor::Cpu({size * n}, dt);
      Tensor mine = in_place.Slice(0, rank * n, (rank + 1) * n);
      std::memcpy(mine.raw_data(), in[rank].raw_data(), in[rank].num_bytes());
      ASSERT_TRUE(world->AllGather(in_place, mine).ok());
      for (int q = 0; q < size; ++q) {
        EXPECT_TRUE(testing::SameBytes(out.Slice(0, q * n, (q + 1) * n), in[q])) << "chunk " << q;
      }
      EXPECT_TRUE(testing::SameBytes(out, in_place));
    }
  }
  EXPECT_TRUE(world->Close().ok());
}

TEST(MpiCommunicator, BroadcastFromEveryRoot) {
  auto world = World();
  for (int root = 0; root < world->size(); ++root) {
    for (DType dt : testing::MainDTypes()) {
      const Tensor sent = RankInput(dt, 1000003, 10 + root, root);
      Tensor x = world->rank() == root ? *CastCpu(sent, dt) : RankInput(dt, 1000003, 20, 0);
      ASSERT_TRUE(world->Broadcast(x, root).ok());
      EXPECT_TRUE(testing::SameBytes(x, sent)) << "root " << root << " " << DTypeName(dt);
    }
  }
  EXPECT_TRUE(world->Close().ok());
}

TEST(MpiCommunicator, SplitIntoRowsAndColumnsOfAMesh) {
  auto world = World();
  const int size = world->size(), r = world->rank();
  if (size % 2 != 0) GTEST_SKIP() << "the mesh needs an even number of ranks";
  // Mesh [size / 2, 2]: rank r at row r / 2, column r % 2 (2x2 with 4 ranks, 1x2 with 2).
  const int rows = size / 2;
  auto tp = world->Split(r / 2, r, "tp");
  auto dp = world->Split(r % 2, r, "dp");
  ASSERT_TRUE(tp.ok() && dp.ok());
  EXPECT_EQ((*tp)->name(), "tp");
  EXPECT_EQ((*tp)->size(), 2);
  EXPECT_EQ((*tp)->rank(), r % 2);
  EXPECT_EQ((*dp)->size(), rows);
  EXPECT_EQ((*dp)->rank(), r / 2);
  for (int q = 0; q < 2; ++q) EXPECT_EQ((*tp)->WorldRank(q), (r / 2) * 2 + q);
  for (int q = 0; q < rows; ++q) EXPECT_EQ((*dp)->WorldRank(q), q * 2 + r % 2);
  Tensor a = Tensor::Cpu({3}, DType::kI32);
  for (int k = 0; k < 3; ++k) a.data<int32_t>()[k] = (1 << r) * (k + 1);
  Tensor b = *CastCpu(a, DType::kI32);
  ASSERT_TRUE((*tp)->AllReduce(a, ReduceOp::kSum).ok());
  ASSERT_TRUE((*dp)->AllReduce(b, ReduceOp::kSum).ok());
  int row_bits = 0, col_bits = 0;
  for (int q = 0; q < size; ++q) {
    if (q / 2 == r / 2) row_bits |= 1 << q;
    if (q % 2 == r % 2) col_bits |= 1 << q;
  }
  for (int k = 0; k < 3; ++k) {
    EXPECT_EQ(a.data<int32_t>()[k], row_bits * (k + 1));
    EXPECT_EQ(b.data<int32_t>()[k], col_bits * (k + 1));
  }
  // kNoColor leaves rank 0 out; reversed keys reverse the order.
  auto rest = world->Split(r == 0 ? kNoColor : 1, -r, "rest");
  ASSERT_TRUE(rest.ok());
  if (r == 0) {
    EXPECT_EQ(rest->get(), nullptr);
  } else {
    EXPECT_EQ((*rest)->size(), size - 1);
    EXPECT_EQ((*rest)->rank(), size - 1 - r);
    EXPECT_TRUE((*rest)->Barrier().ok());
    EXPECT_TRUE((*rest)->Close().ok());
  }
  EXPECT_TRUE((*tp)->Close().ok());
  EXPECT_TRUE((*dp)->Close().ok());
  EXPECT_TRUE(world->Close().ok());
}

TEST(MpiCommunicator, SendRecvRings) {
  auto world = World();
  const int size = world->size(), r = world->rank();
  if (size % 2 != 0) GTEST_SKIP() << "the even/odd ring needs an even number of ranks";
  const int next = (r + 1) % size, prev = (r + size - 1) % size;
  for (DType dt : testing::MainDTypes()) {
    Tensor got = Tensor::Cpu({1000003}, dt);
    ASSERT_TRUE(world->SendRecv(RankInput(dt, 1000003, 5, r), next, got, prev, 3).ok());
    EXPECT_TRUE(testing::SameBytes(got, RankInput(dt, 1000003, 5, prev))) << DTypeName(dt);
  }
  // Blocking Send/Recv: even ranks send first, odd ranks receive first (size is even).
  Tensor got = Tensor::Cpu({3}, DType::kF32);
  const Tensor mine = RankInput(DType::kF32, 3, 6, r);
  if (r % 2 == 0) {
    ASSERT_TRUE(world->Send(mine, next, 7).ok());
    ASSERT_TRUE(world->Recv(got, prev, 7).ok());
  } else {
    ASSERT_TRUE(world->Recv(got, prev, 7).ok());
    ASSERT_TRUE(world->Send(mine, next, 7).ok());
  }
  EXPECT_TRUE(testing::SameBytes(got, RankInput(DType::kF32, 3, 6, prev)));
  EXPECT_TRUE(world->Close().ok());
}

TEST(MpiCommunicator, ArgumentErrorsLeaveTheGroupUsable) {
  auto world = World();
  Tensor out = Tensor::Cpu({3}, DType::kF32);
  EXPECT_EQ(world->ReduceScatter(out, Tensor::Cpu({1}, DType::kF32), ReduceOp::kSum).code(),
            StatusCode::kInvalidArgument);
  Tensor ints = Tensor::CpuZeros({2}, DType::kI32);
  EXPECT_EQ(world->AllReduce(ints, ReduceOp::kAvg).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(world->Recv(out, world->size(), 0).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(world->Barrier().ok());
  EXPECT_TRUE(world->Close().ok());
  EXPECT_EQ(world->Barrier().code(), StatusCode::kFailedPrecondition);
}

TEST(MpiCommunicator, ARankThatSkipsACollectiveIsNamedWithinTheTimeout) {
  auto world = World(/*timeout_s=*/1.0);
  const int skipper = world->size() - 1;
  Tensor x = RankInput(DType::kF32, 1000, 7, world->rank());
  if (world->rank() != skipper) {
    const auto t0 = std::chrono::steady_clock::now();
    const Status s = world->AllReduce(x, ReduceOp::kSum);
    const double took = SecondsSince(t0);
    EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
    EXPECT_NE(s.message().find("group 'world'"), std::string::npos) << s.message();
    EXPECT_NE(s.message().find("AllReduce #1"), std::string::npos) << s.message();
    EXPECT_NE(s.message().find(StrCat("rank ", skipper, " did not arrive")), std::string::npos)
        << s.message();
    EXPECT_GE(took, 0.9);
    EXPECT_LT(took, 2.0);
    const auto t1 = std::chrono::steady_clock::now();
    EXPECT_FALSE(world->Barrier().ok());  // broken for good, fails at once
    EXPECT_LT(SecondsSince(t1), 0.1);
  } else {
    // Come back after the others gave up: the group is broken, and the call says by whom.
    std::this_thread::sleep_for(std::chrono::milliseconds(2500));
    const auto t0 = std::chrono::steady_clock::now();
    const Status s = world->Barrier();
    EXPECT_FALSE(s.ok());
    EXPECT_NE(s.message().find("broke the group"), std::string::npos) << s.message();
    EXPECT_LT(SecondsSince(t0), 0.5);
  }
  EXPECT_TRUE(world->Close().ok());
}

TEST(MpiCommunicator, AbortReachesPeersWaitingInACollective) {
  auto world = World(/*timeout_s=*/30);
  if (world->rank() == 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    EXPECT_TRUE(world->Abort("loss is NaN").ok());
    EXPECT_EQ(world->Barrier().code(), StatusCode::kAborted);
  } else {
    const auto t0 = std::chrono::steady_clock::now();
    const Status s = world->Barrier();
    EXPECT_EQ(s.code(), StatusCode::kAborted) << s.ToString();
    EXPECT_NE(s.message().find("rank 0 aborted the group: loss is NaN"), std::string::npos)
        << s.message();
    EXPECT_LT(SecondsSince(t0), 5.0);
  }
  EXPECT_TRUE(world->Close().ok());
}

}  // namespace
}  // namespace tandem::collectives

TANDEM_MPI_TEST_MAIN()
