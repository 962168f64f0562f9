// PagePool: allocation accounting per use, all-or-nothing allocation, lowest ids first whatever
// the free order, double free aborts, the typed page view, bad sizes.
#include "serve/kv_pool.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>

namespace tandem::serve {
namespace {

TEST(PagePool, AllocatesAndFreesByUse) {
  PagePool pool = std::move(PagePool::Create(HostAllocator(), 1024, 10)).value();
  EXPECT_EQ(pool.free_pages(), 10);
  std::vector<int32_t> kv, adapter;
  ASSERT_TRUE(pool.Allocate(PageUse::kKv, 6, &kv));
  ASSERT_TRUE(pool.Allocate(PageUse::kAdapter, 3, &adapter));
  EXPECT_EQ(kv, (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(pool.used_pages(PageUse::kKv), 6);
  EXPECT_EQ(pool.used_pages(PageUse::kAdapter), 3);
  std::vector<int32_t> more;
  EXPECT_FALSE(pool.Allocate(PageUse::kKv, 2, &more));  // only 1 free: nothing taken
  EXPECT_TRUE(more.empty());
  EXPECT_EQ(pool.free_pages(), 1);
  pool.Free(PageUse::kKv, {4, 1});
  ASSERT_TRUE(pool.Allocate(PageUse::kKv, 2, &more));
  EXPECT_EQ(more, (std::vector<int32_t>{1, 4}));  // lowest first
  pool.Free(PageUse::kAdapter, adapter);
  EXPECT_EQ(pool.used_pages(PageUse::kAdapter), 0);
  EXPECT_EQ(pool.PagesFor(1), 1);
  EXPECT_EQ(pool.PagesFor(1024), 1);
  EXPECT_EQ(pool.PagesFor(1025), 2);
}

TEST(PagePool, PageViewAndBadSizes) {
  PagePool pool = std::move(PagePool::Create(HostAllocator(), 512, 3)).value();
  Tensor pages = pool.PagesAs(DType::kF32);
  EXPECT_EQ(pages.shape(), (Shape{3, 128}));
  pages.data<float>()[3 * 128 - 1] = 1.0f;  // the whole buffer is addressable
  EXPECT_FALSE(PagePool::Create(HostAllocator(), 100, 3).ok());
  EXPECT_FALSE(PagePool::Create(HostAllocator(), 512, 0).ok());
  PagePool counting = std::move(PagePool::Create(HostAllocator(), 512, 3, false)).value();
  EXPECT_FALSE(counting.PagesAs(DType::kF32).defined());
}

TEST(PagePoolDeathTest, DoubleFreeAborts) {
  PagePool pool = std::move(PagePool::Create(HostAllocator(), 256, 2)).value();
  std::vector<int32_t> p;
  ASSERT_TRUE(pool.Allocate(PageUse::kKv, 1, &p));
  pool.Free(PageUse::kKv, p);
  EXPECT_DEATH(pool.Free(PageUse::kKv, p), "not allocated");
}

}  // namespace
}  // namespace tandem::serve
