// Shared state of an in-process thread group (see collectives/thread_group.h): the rendezvous
// every collective goes through, the mailbox of point-to-point messages, and fault injection.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "collectives/internal/common.h"
#include "collectives/thread_group.h"

namespace tandem::collectives::internal {

// The faults of one thread group and a call counter per world rank, shared with every group
// split from it.
class FaultPlan {
 public:
  FaultPlan(int world_size, std::vector<InjectedFault> faults);
  // Counts a communicating call of `world_rank`; Unavailable once the rank is "dead"; sleeps for
  // a kDelay fault.
  Status OnCall(int world_rank);

 private:
  std::vector<InjectedFault> faults_;
  std::unique_ptr<std::atomic<int64_t>[]> calls_;
  int world_size_;
};

// What one rank brought to a rendezvous. The thread group compares these across ranks.
struct Slot {
  OpKind op = OpKind::kBarrier;
  DType dtype = DType::kF32;
  ReduceOp reduce = ReduceOp::kSum;
  int64_t in_numel = 0;
  int64_t out_numel = 0;
  int root = 0;
  int color = 0;
  int key = 0;
  std::string name;  // Split: the new group's name
  const void* in = nullptr;
  void* out = nullptr;
  // Split results, written by the rank completing the rendezvous.
  std::shared_ptr<class GroupState> child;
  int child_rank = -1;
};
// "AllReduce(f32[3], sum)".
std::string DescribeSlot(const Slot& s);

// A message posted by Send, taken by the matching Recv.
struct Message {
  int src = 0;
  int dst = 0;
  int tag = 0;
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t numel = 0;
  bool taken = false;
  Status result;  // set by the receiver: OK or a size/dtype mismatch
};

class GroupState {
 public:
  GroupState(std::string name, std::vector<int> world_ranks, std::shared_ptr<FaultPlan> faults);

  const std::string& name() const { return name_; }
  int size() const { return static_cast<int>(world_ranks_.size()); }
  const std::vector<int>& world_ranks() const { return world_ranks_; }
  FaultPlan& faults() { return *faults_; }
  const std::shared_ptr<FaultPlan>& fault_plan() const { return faults_; }

  // Waits until every rank has arrived (or the deadline passes, or the group breaks). `slot`
  // (nullptr for a pure barrier phase) is published first; `on_complete` runs under the lock in
  // the rank that arrives last and may fill results into the slots or fail the rendezvous. On
  // success, *all (when given) receives every rank's slot. `what` describes the operation for
  // errors ("AllReduce #3 of f32[7]").
  Status Rendezvous(int rank, const Slot* slot, const Deadline& deadline, const std::string& what,
                    const std::function<Status(std::vector<Slot>&)>& on_complete,
                    std::vector<Slot>* all);

  // Synchronous point to point; see Communicator::Send/Recv/SendRecv.
  Status Send(int rank, const Tensor& t, int peer, int tag, const Deadline& deadline);
  Status Recv(int rank, Tensor& t, int peer, int tag, const Deadline& deadline);
  Status SendRecv(int rank, const Tensor& send, int dst, Tensor& recv, int src, int tag,
                  const Deadline& deadline);

  // Breaks the group with `status` unless already broken. Wakes every waiter.
  void Break(const Status& status);
  // The error that broke the group (OK while usable).
  Status broken();

 private:
  std::string Label() const;
  Status BreakLocked(const Status& status);
  // Receives into `t` from `peer`; lock held.
  Status RecvLocked(std::unique_lock<std::mutex>& lock, int rank, Tensor& t, int peer, int tag,
                    const Deadline& deadline);
  Status WaitTakenLocked(std::unique_lock<std::mutex>& lock, Message& m, const Deadline& deadline);

  const std::string name_;
  const std::vector<int> world_ranks_;  // group rank -> world rank
  const std::shared_ptr<FaultPlan> faults_;

  std::mutex mu_;
  std::condition_variable cv_;
  int64_t phase_ = 0;                // rendezvous phases completed
  int arrived_ = 0;                  // ranks arrived at phase_
  std::vector<int64_t> arrived_at_;  // per rank: the phase it last arrived at (-1: never)
  std::vector<Slot> slots_;
  Status broken_;
  int64_t broken_phase_ = -1;    // phase_ when the group broke
  std::list<Message*> mailbox_;  // posted sends, oldest first
};

}  // namespace tandem::collectives::internal
