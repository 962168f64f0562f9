// ParallelRanges: one-off bulk work over [0, n) split across the machine's cores.
//
//   ParallelRanges(n, /*min_per_range=*/1 << 18, [&](int64_t begin, int64_t end) { ... });
//
// [0, n) is cut into equal contiguous ranges of at least `min_per_range` elements, at most one per
// core (and at most 64); fn(begin, end) runs for each on a thread of its own and the call returns
// when all are done. With one range fn runs on the caller's thread. Each call starts its threads:
// for initialisation and first touches of large fresh buffers, not for hot loops (ops use OpenMP).
// fn must be safe to run concurrently on disjoint ranges.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace tandem {

template <typename Fn>
void ParallelRanges(int64_t n, int64_t min_per_range, Fn fn) {
  const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t ranges =
      std::clamp<int64_t>(std::min<int64_t>(n / std::max<int64_t>(1, min_per_range), cores), 1, 64);
  if (ranges == 1) return fn(int64_t{0}, n);
  std::vector<std::thread> pool;
  const int64_t per = (n + ranges - 1) / ranges;
  for (int64_t r = 0; r < ranges; ++r) {
    pool.emplace_back(fn, std::min(n, r * per), std::min(n, (r + 1) * per));
  }
  for (std::thread& t : pool) t.join();
}

}  // namespace tandem
