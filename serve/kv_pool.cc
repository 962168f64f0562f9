// PagePool (serve/kv_pool.h).
#include "serve/kv_pool.h"

#include <algorithm>
#include <functional>

namespace tandem::serve {

StatusOr<PagePool> PagePool::Create(Allocator& allocator, int64_t page_bytes, int64_t num_pages,
                                    bool allocate) {
  if (page_bytes <= 0 || page_bytes % 256 != 0) {
    return InvalidArgumentError(
        StrCat("page_bytes: expected a positive multiple of 256, found ", page_bytes));
  }
  if (num_pages <= 0 || num_pages > INT32_MAX) {
    return InvalidArgumentError(StrCat("pool: expected 1 to 2^31 - 1 pages, found ", num_pages,
                                       " (pool_bytes / page_bytes)"));
  }
  PagePool pool;
  pool.page_bytes_ = page_bytes;
  pool.num_pages_ = num_pages;
  if (allocate) {
    StatusOr<Tensor> buffer = Tensor::Empty({num_pages * page_bytes}, DType::kU8, allocator);
    if (!buffer.ok()) {
      return buffer.status().WithContext(
          StrCat("unified pool of ", num_pages, " pages x ", page_bytes, " bytes"));
    }
    pool.buffer_ = *buffer;
  }
  pool.free_.resize(num_pages);  // ascending ids: already a min-heap
  for (int64_t i = 0; i < num_pages; ++i) pool.free_[i] = static_cast<int32_t>(i);
  pool.owner_.assign(num_pages, -1);
  return pool;
}

bool PagePool::Allocate(PageUse use, int64_t count, std::vector<int32_t>* pages) {
  TANDEM_CHECK(count >= 0);
  if (count > free_pages()) return false;
  for (int64_t i = 0; i < count; ++i) {
    std::pop_heap(free_.begin(), free_.end(), std::greater<int32_t>());  // lowest id to the back
    const int32_t p = free_.back();
    free_.pop_back();
    owner_[p] = static_cast<int8_t>(use);
    pages->push_back(p);
  }
  used_[static_cast<int>(use)] += count;
  return true;
}

void PagePool::Free(PageUse use, const std::vector<int32_t>& pages) {
  for (int32_t p : pages) {
    TANDEM_CHECK_MSG(p >= 0 && p < num_pages_ && owner_[p] == static_cast<int8_t>(use),
                     "PagePool::Free: page ", p, " is not allocated for this use");
    owner_[p] = -1;
    free_.push_back(p);
    std::push_heap(free_.begin(), free_.end(), std::greater<int32_t>());
  }
  used_[static_cast<int>(use)] -= static_cast<int64_t>(pages.size());
}

Tensor PagePool::PagesAs(DType dtype) const {
  if (!buffer_.defined()) return Tensor();
  const int64_t elems = page_bytes_ / static_cast<int64_t>(DTypeSize(dtype));
  return Tensor::Wrap(buffer_.raw_data(), {num_pages_, elems}, dtype, buffer_.device());
}

}  // namespace tandem::serve
