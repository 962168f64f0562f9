// The NCCL backend on GPUs, one rank per GPU. Run by ctest as one process (one rank), and by hand
// under mpirun on a multi-GPU host:  mpirun -np 2 ./collectives_nccl_gpu_test
// Skips without a GPU, without NCCL, or with fewer GPUs than ranks on this host.
#include <gtest/gtest.h>

#include <thread>

#include "collectives/mpi.h"
#include "collectives/nccl.h"
#include "core/cuda_allocator.h"
#include "core/stream.h"
#include "tests/collectives/collectives_test_util.h"
#include "tests/collectives/mpi_test_main.h"

namespace tandem::collectives {
namespace {

using testing::RankInput;
using testing::SecondsSince;

class NcclTest : public ::testing::Test {
 protected:
  void SetUp() override {
    TANDEM_SKIP_WITHOUT_GPU();
    if (!BuiltWithNccl()) GTEST_SKIP() << "built without NCCL";
    const MpiRuntime& mpi = testing::Mpi();
    if (CudaDeviceCount() < mpi.local_size()) {
      GTEST_SKIP() << mpi.local_size() << " ranks on this host but " << CudaDeviceCount()
                   << " GPUs";
    }
    device_ = mpi.local_rank();
    allocator_ = std::move(*CreateCudaCachingAllocator(device_));
  }

  // Host world and NCCL world over it, with `timeout_s`.
  void MakeWorlds(double timeout_s, CudaStream stream = nullptr) {
    auto host = CreateMpiWorld({.timeout_s = timeout_s});
    ASSERT_TRUE(host.ok()) << host.status().ToString();
    host_ = std::move(*host);
    auto nccl = CreateNcclWorld(*host_, device_, {.timeout_s = timeout_s, .stream = stream});
    ASSERT_TRUE(nccl.ok()) << nccl.status().ToString();
    nccl_ = std::move(*nccl);
  }

  void TearDown() override {
    if (nccl_) {
      EXPECT_TRUE(nccl_->Close().ok());
    }
    if (host_) {
      EXPECT_TRUE(host_->Close().ok());
    }
  }

  Tensor ToDevice(const Tensor& host) { return *CopyToDeviceBlocking(host, *allocator_); }
  Tensor ToHost(const Tensor& dev) { return *CopyToHostBlocking(dev); }

  int device_ = 0;
  std::unique_ptr<CachingAllocator> allocator_;  // outlives the tensors the communicators hold
  std::unique_ptr<Communicator> host_;
  std::unique_ptr<Communicator> nccl_;
};

// NCCL rounds bf16 at every step of its ring or tree: up to (ranks - 1) roundings of 2^-8.
::tandem::testing::Tolerance NcclTolerance(DType dt, int ranks) {
  if (dt == DType::kBF16) return {1e-6, ranks / 128.0};
  return testing::ReduceTolerance(dt, ranks);
}

TEST_F(NcclTest, AllReduceReduceScatterAllGatherEveryDTypeAndOddSize) {
  MakeWorlds(60);
  const int size = nccl_->size(), rank = nccl_->rank();
  EXPECT_STREQ(nccl_->backend(), "nccl");
  EXPECT_EQ(nccl_->device(), Device::Cuda(device_));
  for (DType dt : testing::MainDTypes()) {
    for (int64_t n : testing::OddSizes()) {
      SCOPED_TRACE(StrCat(DTypeName(dt), "[", n, "]"));
      std::vector<Tensor> in;
      for (int q = 0; q < size; ++q) in.push_back(RankInput(dt, n, 1, q));
      Tensor x = ToDevice(in[rank]);
      ASSERT_TRUE(nccl_->AllReduce(x, ReduceOp::kSum).ok());
      // Reduce-scatter of [size * n]: chunk `rank` of every rank's input.
      std::vector<Tensor> chunks;
      for (int q = 0; q < size; ++q) chunks.push_back(RankInput(dt, n, 2, q, rank * n));
      Tensor rs_out = *Tensor::Empty({n}, dt, *allocator_);
      ASSERT_TRUE(
          nccl_->ReduceScatter(rs_out, ToDevice(RankInput(dt, n * size, 2, rank)), ReduceOp::kSum)
              .ok());
      Tensor ag_out = *Tensor::Empty({size * n}, dt, *allocator_);
      ASSERT_TRUE(nccl_->AllGather(ag_out, ToDevice(in[rank])).ok());
      ASSERT_TRUE(nccl_->Synchronize().ok());
      EXPECT_TRUE(testing::MatchesValues(
          ToHost(x), testing::ReferenceReduce(in, 0, n, ReduceOp::kSum), NcclTolerance(dt, size)));
      EXPECT_TRUE(testing::MatchesValues(ToHost(rs_out),
                                         testing::ReferenceReduce(chunks, 0, n, ReduceOp::kSum),
                                         NcclTolerance(dt, size)));
      const Tensor gathered = ToHost(ag_out);
      for (int q = 0; q < size; ++q) {
        EXPECT_TRUE(testing::SameBytes(gathered.Slice(0, q * n, (q + 1) * n), in[q]));
      }
    }
  }
}

TEST_F(NcclTest, OtherOpsBroadcastAndInPlaceAllGather) {
  MakeWorlds(60);
  const int size = nccl_->size(), rank = nccl_->rank();
  for (ReduceOp op : {ReduceOp::kMax, ReduceOp::kMin, ReduceOp::kAvg}) {
    std::vector<Tensor> in;
    for (int q = 0; q < size; ++q) in.push_back(RankInput(DType::kF32, 1001, 3, q));
    Tensor x = ToDevice(in[rank]);
    ASSERT_TRUE(nccl_->AllReduce(x, op).ok());
    ASSERT_TRUE(nccl_->Synchronize().ok());
    EXPECT_TRUE(testing::MatchesValues(ToHost(x), testing::ReferenceReduce(in, 0, 1001, op),
                                       NcclTolerance(DType::kF32, size)))
        << ReduceOpName(op);
  }
  for (int root = 0; root < size; ++root) {
    const Tensor sent = RankInput(DType::kBF16, 1000003, 4, root);
    Tensor x = ToDevice(rank == root ? sent : RankInput(DType::kBF16, 1000003, 5, rank));
    ASSERT_TRUE(nccl_->Broadcast(x, root).ok());
    ASSERT_TRUE(nccl_->Synchronize().ok());
    EXPECT_TRUE(testing::SameBytes(ToHost(x), sent)) << "root " << root;
  }
  Tensor all = *Tensor::Empty({size * 3}, DType::kI32, *allocator_);
  Tensor mine = all.Slice(0, rank * 3, rank * 3 + 3);
  Tensor host_mine = RankInput(DType::kI32, 3, 6, rank);
  ASSERT_TRUE(CopyTensor(mine, host_mine, nccl_->stream()).ok());
  ASSERT_TRUE(nccl_->AllGather(all, mine).ok());
  ASSERT_TRUE(nccl_->Synchronize().ok());
  const Tensor got = ToHost(all);
  for (int q = 0; q < size; ++q) {
    EXPECT_TRUE(
        testing::SameBytes(got.Slice(0, q * 3, q * 3 + 3), RankInput(DType::kI32, 3, 6, q)));
  }
}

TEST_F(NcclTest, SendRecvRingAndSplitMesh) {
  MakeWorlds(60);
  const int size = nccl_->size(), r = nccl_->rank();
  if (size < 2 || size % 2 != 0) GTEST_SKIP() << "needs an even number of ranks >= 2";
  const int next = (r + 1) % size, prev = (r + size - 1) % size;
  Tensor got = *Tensor::Empty({1000003}, DType::kF32, *allocator_);
  ASSERT_TRUE(
      nccl_->SendRecv(ToDevice(RankInput(DType::kF32, 1000003, 7, r)), next, got, prev, 0).ok());
  ASSERT_TRUE(nccl_->Synchronize().ok());
  EXPECT_TRUE(testing::SameBytes(ToHost(got), RankInput(DType::kF32, 1000003, 7, prev)));
  // Mesh [size / 2, 2]: tp = rows, dp = columns.
  auto tp = nccl_->Split(r / 2, r, "tp");
  auto dp = nccl_->Split(r % 2, r, "dp");
  ASSERT_TRUE(tp.ok()) << tp.status().ToString();
  ASSERT_TRUE(dp.ok()) << dp.status().ToString();
  EXPECT_EQ((*tp)->rank(), r % 2);
  EXPECT_EQ((*dp)->rank(), r / 2);
  EXPECT_EQ((*dp)->size(), size / 2);
  for (int q = 0; q < 2; ++q) EXPECT_EQ((*tp)->WorldRank(q), (r / 2) * 2 + q);
  Tensor bits = Tensor::Cpu({1}, DType::kI32);
  bits.data<int32_t>()[0] = 1 << r;
  Tensor a = ToDevice(bits), b = ToDevice(bits);
  ASSERT_TRUE((*tp)->AllReduce(a, ReduceOp::kSum).ok());
  ASSERT_TRUE((*dp)->AllReduce(b, ReduceOp::kSum).ok());
  ASSERT_TRUE((*tp)->Synchronize().ok());
  ASSERT_TRUE((*dp)->Synchronize().ok());
  int row_bits = 0, col_bits = 0;
  for (int q = 0; q < size; ++q) {
    if (q / 2 == r / 2) row_bits |= 1 << q;
    if (q % 2 == r % 2) col_bits |= 1 << q;
  }
  EXPECT_EQ(ToHost(a).data<int32_t>()[0], row_bits);
  EXPECT_EQ(ToHost(b).data<int32_t>()[0], col_bits);
  EXPECT_TRUE((*tp)->Close().ok());
  EXPECT_TRUE((*dp)->Close().ok());
}

TEST_F(NcclTest, RunsOnTheCallersStream) {
  auto stream = CudaStreamOwner::Create(device_);
  ASSERT_TRUE(stream.ok());
  MakeWorlds(60, stream->get());
  EXPECT_EQ(nccl_->stream(), stream->get());
  Tensor x = ToDevice(RankInput(DType::kF32, 1000, 8, nccl_->rank()));
  ASSERT_TRUE(nccl_->AllReduce(x, ReduceOp::kSum).ok());
  ASSERT_TRUE(stream->Synchronize().ok());  // ordered on the caller's stream
  std::vector<Tensor> in;
  for (int q = 0; q < nccl_->size(); ++q) in.push_back(RankInput(DType::kF32, 1000, 8, q));
  EXPECT_TRUE(testing::MatchesValues(ToHost(x),
                                     testing::ReferenceReduce(in, 0, 1000, ReduceOp::kSum),
                                     NcclTolerance(DType::kF32, nccl_->size())));
  EXPECT_TRUE(nccl_->Close().ok());
  nccl_.reset();  // before the stream it uses
}

TEST_F(NcclTest, ARankThatSkipsACollectiveIsNamedAndTheCommunicatorAborted) {
  MakeWorlds(/*timeout_s=*/2.0);
  const int size = nccl_->size(), rank = nccl_->rank();
  if (size < 2) GTEST_SKIP() << "needs 2 ranks";
  const int skipper = size - 1;
  Tensor x = ToDevice(RankInput(DType::kF32, 1000, 9, rank));
  ASSERT_TRUE(nccl_->Barrier().ok());  // connections are up: the skip below hangs a kernel
  if (rank != skipper) {
    const auto t0 = std::chrono::steady_clock::now();
    Status s = nccl_->AllReduce(x, ReduceOp::kSum);
    if (s.ok()) s = nccl_->Synchronize();
    EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
    EXPECT_NE(s.message().find("group 'world' (nccl"), std::string::npos) << s.message();
    EXPECT_NE(s.message().find(StrCat("rank ", skipper, " did not arrive")), std::string::npos)
        << s.message();
    EXPECT_NE(s.message().find("AllReduce #2"), std::string::npos) << s.message();
    EXPECT_LT(SecondsSince(t0), 5.0);
    EXPECT_FALSE(nccl_->Barrier().ok());
  } else {
    std::this_thread::sleep_for(std::chrono::seconds(4));
    const Status s = nccl_->Barrier();
    EXPECT_FALSE(s.ok());
    EXPECT_NE(s.message().find("broke the group"), std::string::npos) << s.message();
  }
}

}  // namespace
}  // namespace tandem::collectives

TANDEM_MPI_TEST_MAIN()
