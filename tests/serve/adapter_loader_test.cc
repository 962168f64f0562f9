// AdapterLoader (serve/internal/adapter_loader.h): reads run on the loader's thread, in request
// order, one at a time; a second request for an adapter already queued, in flight or done (not
// taken) is dropped; errors come back as the read's status; on_done runs after each read; the
// destructor returns while reads are still queued.
#include "serve/internal/adapter_loader.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "serve/internal/engine_state.h"

namespace tandem::serve::internal {
namespace {

std::shared_ptr<AdapterEntry> Entry(const std::string& name) {
  auto e = std::make_shared<AdapterEntry>();
  e->name = name;
  e->path = "/nonexistent/" + name;
  return e;
}

// Waits up to 10 s for `n` finished reads.
std::vector<AdapterLoader::Done> WaitFor(AdapterLoader& loader, size_t n) {
  std::vector<AdapterLoader::Done> all;
  for (int i = 0; i < 10000 && all.size() < n; ++i) {
    for (auto& d : loader.TakeDone()) all.push_back(std::move(d));
    if (all.size() < n) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return all;
}

TEST(AdapterLoader, ReadsOnItsThreadInOrderWithoutDuplicates) {
  const std::thread::id caller = std::this_thread::get_id();
  std::atomic<int> reads{0}, wakeups{0};
  std::atomic<bool> release{false};
  AdapterLoader loader(
      [&](const AdapterEntry& e) -> StatusOr<HostAdapter> {
        EXPECT_NE(std::this_thread::get_id(), caller);
        while (!release) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        ++reads;
        if (e.name == "bad") return NotFoundError("no adapter 'bad'");
        HostAdapter h;
        h.ctx = ops::Context::Cpu();
        return h;
      },
      [&] { ++wakeups; });
  auto a = Entry("a"), bad = Entry("bad"), c = Entry("c");
  loader.Request(a);
  loader.Request(bad);
  loader.Request(a);  // queued or in flight: dropped
  loader.Request(c);
  EXPECT_TRUE(loader.Pending(a.get()));
  EXPECT_TRUE(loader.Pending(c.get()));
  release = true;
  std::vector<AdapterLoader::Done> done = WaitFor(loader, 3);
  ASSERT_EQ(done.size(), 3u);
  EXPECT_EQ(done[0].entry, a);
  EXPECT_TRUE(done[0].result.ok());
  EXPECT_EQ(done[1].entry, bad);
  EXPECT_EQ(done[1].result.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(done[2].entry, c);
  EXPECT_EQ(reads.load(), 3);
  EXPECT_EQ(wakeups.load(), 3);
  EXPECT_FALSE(loader.Pending(a.get()));
  loader.Request(a);  // taken: a new request reads again
  EXPECT_EQ(WaitFor(loader, 1).size(), 1u);
  EXPECT_EQ(reads.load(), 4);
}

TEST(AdapterLoader, DestructorDoesNotWaitForTheQueue) {
  std::atomic<int> reads{0};
  auto start = std::chrono::steady_clock::now();
  {
    AdapterLoader loader(
        [&](const AdapterEntry&) -> StatusOr<HostAdapter> {
          ++reads;
          std::this_thread::sleep_for(std::chrono::milliseconds(50));
          return HostAdapter{};
        },
        [] {});
    for (int i = 0; i < 20; ++i) loader.Request(Entry(StrCat("x", i)));
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(reads.load(), 20);
  EXPECT_LT(s, 0.5) << "the destructor waited for queued reads";
}

}  // namespace
}  // namespace tandem::serve::internal
