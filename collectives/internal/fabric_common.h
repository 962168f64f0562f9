// Pieces shared by the libfabric and in-process transports: the libfabric check macro, pacing.
#pragma once

#include <rdma/fabric.h>
#include <rdma/fi_errno.h>

#include <chrono>
#include <cstddef>
#include <mutex>

#include "core/status.h"

// Returns Internal naming the libfabric call and fi_strerror when `expr` (an fi_* call returning
// 0 or a negative error code) fails.
#define TANDEM_FI_RETURN_IF_ERROR(expr, what)                                                   \
  do {                                                                                          \
    const int tandem_fi_rc_ = static_cast<int>(expr);                                           \
    if (tandem_fi_rc_ != 0)                                                                     \
      return ::tandem::InternalError(::tandem::StrCat(                                          \
          ::tandem::internal::SourceLocation(__FILE__, __LINE__), ": libfabric ", #expr, " (", \
          what, "): ", fi_strerror(-tandem_fi_rc_)));                                           \
  } while (0)

namespace tandem::collectives::internal {

// Paces bulk sends across threads: each Acquire(n) reserves the next n/rate seconds of the link
// and sleeps until its turn. A rate of 0 never waits.
class RateLimiter {
 public:
  explicit RateLimiter(double bytes_per_s) : bytes_per_s_(bytes_per_s) {}
  void Acquire(size_t num_bytes);

 private:
  double bytes_per_s_;
  std::mutex mu_;
  std::chrono::steady_clock::time_point next_ = std::chrono::steady_clock::now();
};

}  // namespace tandem::collectives::internal
