// The CUDA caching allocator, the pinned-host allocator and the stream/event owners.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "core/cuda_allocator.h"
#include "core/stream.h"
#include "tests/common/testing.h"

#ifdef TANDEM_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace tandem {
namespace {

constexpr size_t kMiB = size_t{1} << 20;

TEST(AllocatorGpuTest, CpuBuildReportsUnimplemented) {
  if (BuiltWithCuda()) GTEST_SKIP() << "CUDA build: covered by the tests below";
  EXPECT_EQ(CreateCudaCachingAllocator(0).status().code(), StatusCode::kUnimplemented);
  EXPECT_EQ(CreatePinnedHostAllocator().status().code(), StatusCode::kUnimplemented);
  EXPECT_EQ(CudaStreamOwner::Create(0).status().code(), StatusCode::kUnimplemented);
  EXPECT_EQ(CudaEventOwner::Create(0).status().code(), StatusCode::kUnimplemented);
}

// Everything below calls the CUDA runtime directly, so it is compiled in CUDA builds only.
#ifdef TANDEM_WITH_CUDA

TEST(AllocatorGpuTest, MissingDeviceIsUnavailable) {
  TANDEM_SKIP_WITHOUT_GPU();
  EXPECT_EQ(CreateCudaCachingAllocator(CudaDeviceCount()).status().code(),
            StatusCode::kUnavailable);
  EXPECT_EQ(CreateCudaCachingAllocator(-1).status().code(), StatusCode::kUnavailable);
}

TEST(AllocatorGpuTest, StatsAfterAllocAndFree) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto alloc = std::move(CreateCudaCachingAllocator(0)).value();
  EXPECT_EQ(alloc->device(), Device::Cuda(0));
  void* a = *alloc->Allocate(1000);      // small: rounded to 1024
  void* b = *alloc->Allocate(3 * kMiB);  // large: rounded to 4 MiB
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a) % 256, 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b) % 256, 0u);
  AllocatorStats s = alloc->stats();
  EXPECT_EQ(s.bytes_in_use, 1024 + 4 * kMiB);
  EXPECT_EQ(s.peak_bytes_in_use, 1024 + 4 * kMiB);
  EXPECT_EQ(s.bytes_reserved, 1024 + 4 * kMiB);
  EXPECT_EQ(s.num_allocs, 2);
  EXPECT_EQ(s.num_driver_allocs, 2);
  alloc->Deallocate(b, 3 * kMiB);
  s = alloc->stats();
  EXPECT_EQ(s.bytes_in_use, 1024u);
  EXPECT_EQ(s.peak_bytes_in_use, 1024 + 4 * kMiB);
  EXPECT_EQ(s.bytes_reserved, 1024 + 4 * kMiB);  // cached, not returned
  alloc->ResetPeak();
  EXPECT_EQ(alloc->stats().peak_bytes_in_use, 1024u);
  alloc->ReleaseCached();
  s = alloc->stats();
  EXPECT_EQ(s.bytes_reserved, 1024u);  // `a` is still in use
  alloc->Deallocate(a, 1000);
  alloc->ReleaseCached();
  EXPECT_EQ(alloc->stats().bytes_reserved, 0u);
  EXPECT_EQ(alloc->stats().bytes_in_use, 0u);
}

TEST(AllocatorGpuTest, ReusesFreedBlocksWithoutDriverCalls) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto alloc = std::move(CreateCudaCachingAllocator(0)).value();
  void* p = *alloc->Allocate(5 * kMiB);
  alloc->Deallocate(p, 5 * kMiB);
  const int64_t driver_before = alloc->stats().num_driver_allocs;
  // Same class (6 MiB), and a smaller request that still fits within twice its rounded size.
  void* q = *alloc->Allocate(5 * kMiB + 100);
  EXPECT_EQ(q, p);
  alloc->Deallocate(q, 5 * kMiB + 100);
  void* r = *alloc->Allocate(4 * kMiB);
  EXPECT_EQ(r, p);
  EXPECT_EQ(alloc->stats().num_driver_allocs, driver_before);
  // A small request does not take the large cached block (it would waste more than half).
  void* small = *alloc->Allocate(512);
  EXPECT_NE(small, p);
  EXPECT_EQ(alloc->stats().num_driver_allocs, driver_before + 1);
  alloc->Deallocate(r, 4 * kMiB);
  alloc->Deallocate(small, 512);
}

TEST(AllocatorGpuTest, ManySizesKeepDataAndBalanceStats) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto alloc = std::move(CreateCudaCachingAllocator(0)).value();
  std::mt19937_64 gen(77);
  struct Block {
    void* ptr;
    size_t num_bytes;
    uint8_t fill;
  };
  std::vector<Block> live;
  for (int round = 0; round < 3; ++round) {
    for (int i = 0; i < 40; ++i) {
      const size_t n = (i % 4 == 3) ? 1 + gen() % (5 * kMiB) : gen() % 70000;
      void* p = *alloc->Allocate(n);
      const auto fill = static_cast<uint8_t>(gen());
      if (n > 0) {
        ASSERT_EQ(cudaMemset(p, fill, n), cudaSuccess);
      }
      live.push_back({p, n, fill});
    }
    // Every block still holds its own bytes (no two live blocks overlap).
    for (const Block& b : live) {
      if (b.num_bytes == 0) continue;
      std::vector<uint8_t> host(b.num_bytes);
      ASSERT_EQ(cudaMemcpy(host.data(), b.ptr, b.num_bytes, cudaMemcpyDeviceToHost), cudaSuccess);
      const std::vector<uint8_t> expected(b.num_bytes, b.fill);
      ASSERT_EQ(std::memcmp(host.data(), expected.data(), b.num_bytes), 0)
          << b.num_bytes << " bytes";
    }
    // Free a random half.
    std::shuffle(live.begin(), live.end(), gen);
    for (size_t k = live.size() / 2; k < live.size(); ++k) {
      alloc->Deallocate(live[k].ptr, live[k].num_bytes);
    }
    live.resize(live.size() / 2);
  }
  const AllocatorStats s = alloc->stats();
  EXPECT_EQ(s.num_allocs, 120);
  EXPECT_LT(s.num_driver_allocs, 120);  // freed blocks were reused
  EXPECT_LE(s.bytes_in_use, s.bytes_reserved);
  for (const Block& b : live) alloc->Deallocate(b.ptr, b.num_bytes);
  EXPECT_EQ(alloc->stats().bytes_in_use, 0u);
}

TEST(AllocatorGpuTest, ConcurrentUse) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto alloc = std::move(CreateCudaCachingAllocator(0)).value();
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&alloc, t] {
      for (int i = 0; i < 200; ++i) {
        const size_t n = 512 * (1 + (i + t) % 7);
        void* p = alloc->Allocate(n).value();
        alloc->Deallocate(p, n);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(alloc->stats().bytes_in_use, 0u);
  EXPECT_EQ(alloc->stats().num_allocs, 800);
}

TEST(AllocatorGpuTest, OutOfMemoryIsResourceExhausted) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto alloc = std::move(CreateCudaCachingAllocator(0)).value();
  const size_t huge = size_t{1} << 50;  // 1 PiB
  StatusOr<void*> p = alloc->Allocate(huge);
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(p.status().message().find(std::to_string(huge)), std::string::npos)
      << p.status().message();
  EXPECT_NE(p.status().message().find("in use"), std::string::npos);
  EXPECT_NE(p.status().message().find("reserved"), std::string::npos);
  // The allocator still works afterwards.
  void* q = *alloc->Allocate(1024);
  alloc->Deallocate(q, 1024);
}

TEST(AllocatorGpuTest, PinnedRoundTrip) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto pinned = std::move(CreatePinnedHostAllocator()).value();
  auto device = std::move(CreateCudaCachingAllocator(0)).value();
  EXPECT_TRUE(pinned->device().is_cpu());
  constexpr size_t kN = 3 * kMiB + 17;
  auto* src = static_cast<uint8_t*>(*pinned->Allocate(kN));
  auto* dst = static_cast<uint8_t*>(*pinned->Allocate(kN));
  void* dev = *device->Allocate(kN);
  cudaPointerAttributes attr{};
  ASSERT_EQ(cudaPointerGetAttributes(&attr, src), cudaSuccess);
  EXPECT_EQ(attr.type, cudaMemoryTypeHost);  // page-locked, not pageable
  std::mt19937 gen(5);
  for (size_t i = 0; i < kN; ++i) src[i] = static_cast<uint8_t>(gen());
  std::memset(dst, 0, kN);
  auto stream = std::move(CudaStreamOwner::Create(0)).value();
  auto start = std::move(CudaEventOwner::Create(0)).value();
  auto end = std::move(CudaEventOwner::Create(0)).value();
  auto native = reinterpret_cast<cudaStream_t>(stream.get());
  ASSERT_TRUE(start.Record(stream.get()).ok());
  ASSERT_EQ(cudaMemcpyAsync(dev, src, kN, cudaMemcpyHostToDevice, native), cudaSuccess);
  ASSERT_EQ(cudaMemcpyAsync(dst, dev, kN, cudaMemcpyDeviceToHost, native), cudaSuccess);
  ASSERT_TRUE(end.Record(stream.get()).ok());
  StatusOr<float> ms = CudaEventOwner::ElapsedMs(start, end);
  ASSERT_TRUE(ms.ok()) << ms.status().ToString();
  EXPECT_GE(*ms, 0.0f);
  ASSERT_TRUE(stream.Synchronize().ok());
  EXPECT_EQ(std::memcmp(src, dst, kN), 0);
  EXPECT_EQ(pinned->stats().bytes_in_use, 2 * 4 * kMiB);
  pinned->Deallocate(src, kN);
  void* again = *pinned->Allocate(kN);
  EXPECT_EQ(again, src);  // reused from the cache
  EXPECT_EQ(pinned->stats().num_driver_allocs, 2);
  pinned->Deallocate(again, kN);
  pinned->Deallocate(dst, kN);
  device->Deallocate(dev, kN);
}

TEST(AllocatorGpuTest, StreamsOrderWorkThroughEvents) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto a = std::move(CudaStreamOwner::Create(0)).value();
  auto b = std::move(CudaStreamOwner::Create(0)).value();
  auto done = std::move(CudaEventOwner::Create(0, /*timing=*/false)).value();
  auto alloc = std::move(CreateCudaCachingAllocator(0)).value();
  constexpr size_t kN = 1 << 20;
  void* x = *alloc->Allocate(kN);
  void* y = *alloc->Allocate(kN);
  ASSERT_EQ(cudaMemsetAsync(x, 0x5a, kN, reinterpret_cast<cudaStream_t>(a.get())), cudaSuccess);
  ASSERT_TRUE(done.Record(a.get()).ok());
  ASSERT_TRUE(b.Wait(done).ok());
  ASSERT_EQ(
      cudaMemcpyAsync(y, x, kN, cudaMemcpyDeviceToDevice, reinterpret_cast<cudaStream_t>(b.get())),
      cudaSuccess);
  ASSERT_TRUE(b.Synchronize().ok());
  std::vector<uint8_t> host(kN);
  ASSERT_EQ(cudaMemcpy(host.data(), y, kN, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(std::count(host.begin(), host.end(), uint8_t{0x5a}), static_cast<int64_t>(kN));
  // Moving an owner transfers the handle; the moved-from owner holds none.
  CudaStreamOwner moved = std::move(a);
  EXPECT_EQ(a.get(), nullptr);  // NOLINT(bugprone-use-after-move): checking the moved-from state
  EXPECT_NE(moved.get(), nullptr);
  StatusOr<float> untimed = CudaEventOwner::ElapsedMs(done, done);
  EXPECT_FALSE(untimed.ok());  // events made without timing cannot be timed
  alloc->Deallocate(x, kN);
  alloc->Deallocate(y, kN);
}

#endif  // TANDEM_WITH_CUDA

}  // namespace
}  // namespace tandem
