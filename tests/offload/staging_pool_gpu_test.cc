// On a GPU machine: staging slabs come from cudaHostAlloc (page-locked, known to CUDA), feed
// cudaMemcpyAsync both ways bit for bit, and are at the same time the io_uring fixed buffers of an
// IoUringStorage whose round trips stay exact. Skipped without a GPU.
#include <cstring>
#include <vector>

#include "core/rng.h"
#include "offload/staging_pool.h"
#include "offload/storage.h"
#include "tests/common/testing.h"

#if defined(TANDEM_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace tandem::offload {
namespace {

TEST(StagingPoolGpuTest, SlabsArePinnedAndCopyToTheDeviceAndBack) {
  TANDEM_SKIP_WITHOUT_GPU();
#if defined(TANDEM_WITH_CUDA)
  const size_t kBytes = size_t{1} << 20;
  auto pool = StagingPool::Create({.slab_bytes = kBytes, .num_slabs = 2});
  ASSERT_TRUE(pool.ok()) << pool.status().ToString();
  ASSERT_TRUE((*pool)->cuda_pinned());
  StagingPool::Slab src = (*pool)->Acquire(), dst = (*pool)->Acquire();
  cudaPointerAttributes attr{};
  ASSERT_EQ(cudaPointerGetAttributes(&attr, src.data), cudaSuccess);
  EXPECT_EQ(attr.type, cudaMemoryTypeHost);
  Rng rng(1);
  for (size_t i = 0; i < kBytes; ++i) src.data[i] = static_cast<char>(rng.NextU32());
  void* dev = nullptr;
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaMalloc(&dev, kBytes), cudaSuccess);
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  EXPECT_EQ(cudaMemcpyAsync(dev, src.data, kBytes, cudaMemcpyHostToDevice, stream), cudaSuccess);
  EXPECT_EQ(cudaMemcpyAsync(dst.data, dev, kBytes, cudaMemcpyDeviceToHost, stream), cudaSuccess);
  EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  EXPECT_EQ(0, std::memcmp(src.data, dst.data, kBytes));
  cudaStreamDestroy(stream);
  cudaFree(dev);
  (*pool)->Release(src);
  (*pool)->Release(dst);
#endif
}

TEST(StagingPoolGpuTest, IoUringWithCudaPinnedFixedBuffersRoundTrips) {
  TANDEM_SKIP_WITHOUT_GPU();
  tandem::testing::TempDir dir;
  IoUringStorageOptions o;
  o.pin_with_cuda = true;
  o.slab_bytes = 64 << 10;
  auto storage = IoUringStorage::Open(dir.Join("gpu.bin"), o);
  ASSERT_TRUE(storage.ok()) << storage.status().ToString();
  std::vector<char> data(300001), back(300001);
  Rng rng(2);
  for (char& c : data) c = static_cast<char>(rng.NextU32());
  ASSERT_TRUE((*storage)->Write(777, data.data(), data.size()).ok());
  ASSERT_TRUE((*storage)->Read(777, back.data(), back.size()).ok());
  EXPECT_EQ(0, std::memcmp(data.data(), back.data(), data.size()));
  RecordProperty("fixed_buffers", (*storage)->fixed_buffers() ? "yes" : "no");
  RecordProperty("direct_io", (*storage)->direct_io() ? "yes" : "no");
}

}  // namespace
}  // namespace tandem::offload
