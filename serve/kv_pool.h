// PagePool: the serving engine's unified memory pool, S-LoRA style. One device buffer cut into
// fixed-size byte pages, shared by KV-cache blocks and adapter weights; admission and preemption
// look at one free count.
//
// KV layout (the engine's choice, serve/infer_model.h): a KV "block" is `block_tokens`
// consecutive positions of one request in ONE layer: page = K then V of those positions,
// [block_tokens, Hkv, D] each, in the compute dtype. A request holding n blocks therefore holds
// n * L pages, allocated L at a time (one per layer) when it crosses a block boundary; its block
// table is [L][n] page ids. Pages are in bytes so GQA models and adapters of any rank fit: an
// adapter is charged ceil(bytes / page_bytes) pages for as long as it is resident on the device.
//
//   TANDEM_ASSIGN_OR_RETURN(PagePool pool, PagePool::Create(ctx.allocator(), 64 << 10, 1024));
//   std::vector<int32_t> pages;
//   if (pool.Allocate(PageUse::kKv, 22, &pages)) { ... } else { preempt someone }
//   pool.Free(PageUse::kKv, pages);
//
// Ownership: the pool owns its buffer. Thread-safety: none; the engine thread owns the pool.
#pragma once

#include <cstdint>
#include <vector>

#include "core/allocator.h"
#include "core/dtype.h"
#include "core/status.h"
#include "core/tensor.h"

namespace tandem::serve {

enum class PageUse : uint8_t { kKv = 0, kAdapter = 1 };

class PagePool {
 public:
  PagePool() = default;
  PagePool(PagePool&&) = default;
  PagePool& operator=(PagePool&&) = default;

  // num_pages pages of page_bytes each (page_bytes a positive multiple of 256) from `allocator`.
  // With `allocate` false no memory is taken (accounting only: adapter pages, tests).
  static StatusOr<PagePool> Create(Allocator& allocator, int64_t page_bytes, int64_t num_pages,
                                   bool allocate = true);

  int64_t page_bytes() const { return page_bytes_; }
  int64_t num_pages() const { return num_pages_; }
  int64_t free_pages() const { return static_cast<int64_t>(free_.size()); }
  int64_t used_pages(PageUse use) const { return used_[static_cast<int>(use)]; }
  // Pages needed for num_bytes.
  int64_t PagesFor(int64_t num_bytes) const { return (num_bytes + page_bytes_ - 1) / page_bytes_; }

  // Appends `count` free page ids to *pages and returns true, or returns false and changes
  // nothing when fewer are free. Lowest ids first (deterministic).
  bool Allocate(PageUse use, int64_t count, std::vector<int32_t>* pages);
  // Returns pages to the pool. Each must be allocated for `use` (checked: a double free aborts).
  void Free(PageUse use, const std::vector<int32_t>& pages);

  // The whole buffer viewed as [num_pages, page_bytes / DTypeSize(dtype)] of `dtype` (row = page).
  // Undefined when created without memory.
  Tensor PagesAs(DType dtype) const;

 private:
  int64_t page_bytes_ = 0, num_pages_ = 0;
  Tensor buffer_;  // u8 [num_pages * page_bytes]
  // Free page ids as a min-heap (lowest id handed out first, whatever the order of frees):
  // O(log P) per page, so a pool of 600k pages (38 GB of 64 KiB pages) costs nothing to free into.
  std::vector<int32_t> free_;
  std::vector<int8_t> owner_;  // per page: -1 free, else PageUse
  int64_t used_[2] = {0, 0};
};

}  // namespace tandem::serve
