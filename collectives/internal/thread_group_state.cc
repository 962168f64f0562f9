#include "collectives/internal/thread_group_state.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <thread>

namespace tandem::collectives::internal {

FaultPlan::FaultPlan(int world_size, std::vector<InjectedFault> faults)
    : faults_(std::move(faults)),
      calls_(new std::atomic<int64_t>[world_size]),
      world_size_(world_size) {
  for (int r = 0; r < world_size; ++r) calls_[r] = 0;
}

Status FaultPlan::OnCall(int world_rank) {
  TANDEM_CHECK(world_rank >= 0 && world_rank < world_size_);
  const int64_t call = calls_[world_rank]++;
  for (const InjectedFault& f : faults_) {
    if (f.rank != world_rank) continue;
    if (f.kind == InjectedFault::Kind::kNeverArrive && call >= f.at_call) {
      return UnavailableError(StrCat("thread group rank ", world_rank,
                                     " is dead (injected fault at call ", f.at_call, ")"));
    }
    if (f.kind == InjectedFault::Kind::kDelay && call == f.at_call) {
      std::this_thread::sleep_for(std::chrono::duration<double>(f.delay_s));
    }
  }
  return Status::Ok();
}

std::string DescribeSlot(const Slot& s) {
  const char* dt = DTypeName(s.dtype);
  switch (s.op) {
    case OpKind::kAllReduce:
      return StrCat("AllReduce(", dt, "[", s.in_numel, "], ", ReduceOpName(s.reduce), ")");
    case OpKind::kReduceScatter:
      return StrCat("ReduceScatter(", dt, "[", s.in_numel, "] -> [", s.out_numel, "], ",
                    ReduceOpName(s.reduce), ")");
    case OpKind::kAllGather:
      return StrCat("AllGather(", dt, "[", s.in_numel, "] -> [", s.out_numel, "])");
    case OpKind::kBroadcast:
      return StrCat("Broadcast(", dt, "[", s.in_numel, "], root ", s.root, ")");
    case OpKind::kSplit:
      return StrCat("Split(color ", s.color, ", key ", s.key, ", '", s.name, "')");
    default:
      return StrCat(OpName(s.op), "()");
  }
}

GroupState::GroupState(std::string name, std::vector<int> world_ranks,
                       std::shared_ptr<FaultPlan> faults)
    : name_(std::move(name)),
      world_ranks_(std::move(world_ranks)),
      faults_(std::move(faults)),
      arrived_at_(world_ranks_.size(), -1),
      slots_(world_ranks_.size()) {}

std::string GroupState::Label() const {
  return StrCat("group '", name_, "' (threads, ", size(), " ranks)");
}

Status GroupState::BreakLocked(const Status& status) {
  if (broken_.ok()) {
    broken_ = status;
    broken_phase_ = phase_;
    cv_.notify_all();
  }
  return broken_;
}

void GroupState::Break(const Status& status) {
  std::lock_guard<std::mutex> lock(mu_);
  BreakLocked(status).IgnoreError();
}

Status GroupState::broken() {
  std::lock_guard<std::mutex> lock(mu_);
  return broken_;
}

Status GroupState::Rendezvous(int rank, const Slot* slot, const Deadline& deadline,
                              const std::string& what,
                              const std::function<Status(std::vector<Slot>&)>& on_complete,
                              std::vector<Slot>* all) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!broken_.ok()) return broken_;
  const int64_t my_phase = phase_;
  if (slot) slots_[rank] = *slot;
  arrived_at_[rank] = my_phase;
  if (++arrived_ == size()) {
    Status s = on_complete ? on_complete(slots_) : Status::Ok();
    if (!s.ok()) BreakLocked(s).IgnoreError();
    arrived_ = 0;
    ++phase_;
    cv_.notify_all();
  } else {
    const bool done =
        cv_.wait_until(lock, deadline.at(), [&] { return phase_ != my_phase || !broken_.ok(); });
    if (!done) {
      std::vector<int> missing;
      for (int r = 0; r < size(); ++r) {
        if (arrived_at_[r] != my_phase) missing.push_back(r);
      }
      return BreakLocked(DeadlineExceededError(
          StrCat(Label(), ": ", what, " did not complete within ", deadline.timeout_s(), " s: rank",
                 missing.size() > 1 ? "s " : " ", RankList(missing, world_ranks_),
                 " did not arrive (noticed by rank ", rank, ")")));
    }
  }
  // Completed unless the group broke at or before this phase.
  if (!broken_.ok() && (phase_ == my_phase || broken_phase_ <= my_phase)) return broken_;
  if (all) *all = slots_;
  return Status::Ok();
}

Status GroupState::Send(int rank, const Tensor& t, int peer, int tag, const Deadline& deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!broken_.ok()) return broken_;
  Message m{rank, peer, tag, t.raw_data(), t.dtype(), t.numel()};
  mailbox_.push_back(&m);
  cv_.notify_all();
  return WaitTakenLocked(lock, m, deadline);
}

Status GroupState::WaitTakenLocked(std::unique_lock<std::mutex>& lock, Message& m,
                                   const Deadline& deadline) {
  const bool done = cv_.wait_until(lock, deadline.at(), [&] { return m.taken || !broken_.ok(); });
  if (m.taken) return m.result;
  mailbox_.remove(&m);
  if (!done) {
    return BreakLocked(DeadlineExceededError(
        StrCat(Label(), ": Send from rank ", m.src, " to rank ", RankList({m.dst}, world_ranks_),
               " (tag ", m.tag, ", ", DTypeName(m.dtype), "[", m.numel,
               "]) was not received within ", deadline.timeout_s(), " s")));
  }
  return broken_;
}

Status GroupState::RecvLocked(std::unique_lock<std::mutex>& lock, int rank, Tensor& t, int peer,
                              int tag, const Deadline& deadline) {
  Message* found = nullptr;
  const bool done = cv_.wait_until(lock, deadline.at(), [&] {
    if (!broken_.ok()) return true;
    for (Message* m : mailbox_) {
      if (m->src == peer && m->dst == rank && m->tag == tag) {
        found = m;
        return true;
      }
    }
    return false;
  });
  if (!broken_.ok()) return broken_;
  if (!done) {
    return BreakLocked(DeadlineExceededError(StrCat(
        Label(), ": Recv on rank ", rank, " from rank ", RankList({peer}, world_ranks_), " (tag ",
        tag, ") got nothing within ", deadline.timeout_s(), " s: the peer did not send")));
  }
  mailbox_.remove(found);
  found->taken = true;
  if (found->dtype != t.dtype() || found->numel != t.numel()) {
    found->result = BreakLocked(InvalidArgumentError(
        StrCat(Label(), ": rank ", peer, " sent ", DTypeName(found->dtype), "[", found->numel,
               "] (tag ", tag, ") but rank ", rank, " receives ", BufferLabel(t))));
    cv_.notify_all();
    return found->result;
  }
  std::memcpy(t.raw_data(), found->data, t.num_bytes());
  cv_.notify_all();
  return Status::Ok();
}

Status GroupState::Recv(int rank, Tensor& t, int peer, int tag, const Deadline& deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!broken_.ok()) return broken_;
  return RecvLocked(lock, rank, t, peer, tag, deadline);
}

Status GroupState::SendRecv(int rank, const Tensor& send, int dst, Tensor& recv, int src, int tag,
                            const Deadline& deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!broken_.ok()) return broken_;
  Message m{rank, dst, tag, send.raw_data(), send.dtype(), send.numel()};
  mailbox_.push_back(&m);
  cv_.notify_all();
  Status r = RecvLocked(lock, rank, recv, src, tag, deadline);
  Status s = WaitTakenLocked(lock, m, deadline);
  return r.ok() ? s : r;
}

}  // namespace tandem::collectives::internal
