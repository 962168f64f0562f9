// Universal checkpoints under mpirun: the ranks save their tensor-parallel slices (tp = world and
// dp x tp = 2 x world/2), then every rank reads its slices under tp 1, 2 and 4 and gets bitwise
// the independently sliced tensors.
// mpi-ranks: 2 4
#include <gtest/gtest.h>

#include <filesystem>

#include "checkpoint/universal.h"
#include "collectives/mpi.h"
#include "tests/checkpoint/universal_test_util.h"
#include "tests/collectives/mpi_test_main.h"

namespace tandem::checkpoint {
namespace {

using collectives::testing::Mpi;

// A directory every rank agrees on (rank 0 makes it; its name is broadcast).
std::string SharedDir(collectives::Communicator& world, const std::string& tag) {
  Tensor id = Tensor::Cpu({1}, DType::kI64);
  id.data<int64_t>()[0] = static_cast<int64_t>(::getpid());
  TANDEM_CHECK_OK(world.Broadcast(id, 0));
  return StrCat(std::filesystem::temp_directory_path().string(), "/tandem_ckpt_mpi_",
                id.data<int64_t>()[0], "_", tag);
}

TEST(UniversalMpi, SaveUnderOneMeshReadUnderAnother) {
  auto world = collectives::CreateMpiWorld({.timeout_s = 60});
  ASSERT_TRUE(world.ok());
  const int rank = (*world)->rank(), size = (*world)->size();
  for (int tp : {size, size / 2}) {
    if (tp < 1) continue;
    const int dp = size / tp;
    const std::string dir = SharedDir(**world, StrCat("tp", tp));
    auto path = SaveUniversal(dir, testing::MetaFor(11, dp, tp),
                              testing::ShardsOf(rank / tp, rank % tp, tp, 17, 11), world->get(),
                              {.chunk_bytes = 96});
    ASSERT_TRUE(path.ok()) << path.status().ToString();
    auto reader = UniversalReader::Open(dir);
    ASSERT_TRUE(reader.ok()) << reader.status().ToString();
    EXPECT_EQ(reader->meta().dp, dp);
    EXPECT_EQ(reader->meta().tp, tp);
    for (int t : {1, 2, 4}) {
      testing::ExpectReadsMatch(*reader, rank % t, t, 17);
    }
    if (rank == 0) {
      EXPECT_TRUE(reader->VerifyAll().ok());
    }
    ASSERT_TRUE((*world)->Barrier().ok());
    if (rank == 0) std::filesystem::remove_all(dir);
  }
  ASSERT_TRUE((*world)->Close().ok());
}

}  // namespace
}  // namespace tandem::checkpoint

TANDEM_MPI_TEST_MAIN()
