// In-process communicators: N ranks as N threads of one process, sharing memory. For unit tests
// of parallel code (no mpirun needed) and for testing failure handling deterministically.
//
//   auto comms = CreateThreadGroup(4, {.timeout_s = 5});
//   std::vector<std::thread> threads;
//   for (int r = 0; r < 4; ++r)
//     threads.emplace_back([&, r] { TANDEM_CHECK_OK(comms[r]->AllReduce(x[r], ReduceOp::kSum)); });
//
// Semantics are those of collectives/communicator.h, with two strengthenings that make tests
// exact: reductions combine ranks in rank order ((x0 + x1) + x2 ..., in f32 for bf16/f16, rounded
// once), so results are bitwise deterministic; and a group checks that every rank called the
// same operation with the same dtype, sizes, root and reduce op, failing all of them with
// InvalidArgument naming each rank's call otherwise. Timeouts name the ranks that did not arrive.
//
// Fault injection: an InjectedFault makes one rank misbehave at its at_call-th call (counted
// over every communicator of the group, including those split from it, 0-based):
//   - kNeverArrive: that call and every later one return Unavailable at once without taking
//     part, as if the process had died; peers time out naming the rank.
//   - kDelay: that one call sleeps delay_s first (a slow rank).
//
// Ownership: element i belongs to rank i's thread; the group's shared state lives until the last
// communicator of the group (and of groups split from it) is gone.
// Thread-safety: each communicator is used by one thread at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "collectives/communicator.h"

namespace tandem::collectives {

struct InjectedFault {
  enum class Kind { kNeverArrive, kDelay };
  int rank = 0;         // rank in the group CreateThreadGroup makes
  int64_t at_call = 0;  // 0-based index of that rank's call, counted over all derived groups
  Kind kind = Kind::kNeverArrive;
  double delay_s = 0;  // kDelay only
};

// `size` communicators named "world"; element i has rank i. `size` >= 1.
std::vector<std::unique_ptr<Communicator>> CreateThreadGroup(
    int size, const CollectiveOptions& options, const std::vector<InjectedFault>& faults = {});

}  // namespace tandem::collectives
