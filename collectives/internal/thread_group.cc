// The in-process backend: ThreadCommunicator, one per rank, over a shared GroupState.
#include "collectives/thread_group.h"

#include <algorithm>
#include <cstring>
#include <map>

#include "collectives/internal/host_reduce.h"
#include "collectives/internal/thread_group_state.h"

namespace tandem::collectives {
namespace internal {
namespace {

// Every rank must call the same operation with matching arguments.
Status CheckSameCall(const std::vector<Slot>& slots, const std::string& label) {
  const Slot& a = slots[0];
  for (const Slot& b : slots) {
    const bool same = a.op == b.op && a.dtype == b.dtype && a.reduce == b.reduce &&
                      a.in_numel == b.in_numel && a.out_numel == b.out_numel && a.root == b.root;
    if (same) continue;  // Split's color, key and name may differ by design
    std::string calls;
    for (size_t r = 0; r < slots.size(); ++r) {
      calls += StrCat(r ? "; " : "", "rank ", r, ": ", DescribeSlot(slots[r]));
    }
    return InvalidArgumentError(StrCat(label, ": ranks made different calls: ", calls));
  }
  return Status::Ok();
}

// Split: one new GroupState per color, members ordered by (key, rank).
Status MakeChildren(std::vector<Slot>& slots, const GroupState& parent) {
  std::map<int, std::vector<int>> members;
  for (int r = 0; r < static_cast<int>(slots.size()); ++r) {
    if (slots[r].color != kNoColor) members[slots[r].color].push_back(r);
  }
  for (auto& [color, ranks] : members) {
    std::stable_sort(ranks.begin(), ranks.end(),
                     [&](int a, int b) { return slots[a].key < slots[b].key; });
    for (int r : ranks) {
      if (slots[r].name != slots[ranks[0]].name) {
        return InvalidArgumentError(StrCat("group '", parent.name(), "': Split color ", color,
                                           " named '", slots[ranks[0]].name, "' by rank ", ranks[0],
                                           " and '", slots[r].name, "' by rank ", r));
      }
    }
    std::vector<int> world;
    for (int r : ranks) world.push_back(parent.world_ranks()[r]);
    auto child =
        std::make_shared<GroupState>(slots[ranks[0]].name, std::move(world), parent.fault_plan());
    for (int i = 0; i < static_cast<int>(ranks.size()); ++i) {
      slots[ranks[i]].child = child;
      slots[ranks[i]].child_rank = i;
    }
  }
  return Status::Ok();
}

class ThreadCommunicator final : public Communicator {
 public:
  ThreadCommunicator(std::shared_ptr<GroupState> group, int rank, CollectiveOptions options)
      : group_(std::move(group)), rank_(rank), options_(options) {}

  int rank() const override { return rank_; }
  int size() const override { return group_->size(); }
  std::string name() const override { return group_->name(); }
  const char* backend() const override { return "threads"; }
  Device device() const override { return Device::Cpu(); }
  int WorldRank(int group_rank) const override {
    TANDEM_CHECK(group_rank >= 0 && group_rank < size());
    return group_->world_ranks()[group_rank];
  }

  Status AllReduce(Tensor& inout, ReduceOp op) override {
    TANDEM_RETURN_IF_ERROR(ValidateAllReduce(inout, op, device()));
    Slot s = MakeSlot(OpKind::kAllReduce, inout, inout, op);
    std::vector<Slot> all;
    return Collective(s, BufferLabel(inout), &all, [&]() -> Status {
      // Every rank reads every input, so the result goes to a private buffer first.
      Tensor result = Tensor::Cpu(inout.shape(), inout.dtype());
      ReduceInOrder(result.raw_data(), Inputs(all, 0), inout.numel(), inout.dtype(), op);
      TANDEM_RETURN_IF_ERROR(Phase("AllReduce (done reading)"));
      std::memcpy(inout.raw_data(), result.raw_data(), inout.num_bytes());
      return Status::Ok();
    });
  }

  Status ReduceScatter(Tensor& out, const Tensor& in, ReduceOp op) override {
    TANDEM_RETURN_IF_ERROR(ValidateReduceScatter(out, in, op, size(), device()));
    Slot s = MakeSlot(OpKind::kReduceScatter, in, out, op);
    std::vector<Slot> all;
    return Collective(s, BufferLabel(in), &all, [&]() -> Status {
      const int64_t offset = rank_ * static_cast<int64_t>(out.num_bytes());
      ReduceInOrder(out.raw_data(), Inputs(all, offset), out.numel(), out.dtype(), op);
      return Phase("ReduceScatter (done reading)");
    });
  }

  Status AllGather(Tensor& out, const Tensor& in) override {
    bool in_place = false;
    TANDEM_RETURN_IF_ERROR(ValidateAllGather(out, in, rank_, size(), device(), &in_place));
    Slot s = MakeSlot(OpKind::kAllGather, in, out, ReduceOp::kSum);
    std::vector<Slot> all;
    return Collective(s, BufferLabel(in), &all, [&]() -> Status {
      // Only chunk r of rank r's `out` may alias its `in`; the other chunks are free to write.
      for (int r = 0; r < size(); ++r) {
        if (r == rank_ && in_place) continue;
        std::memcpy(static_cast<char*>(out.raw_data()) + r * in.num_bytes(), all[r].in,
                    in.num_bytes());
      }
      return Phase("AllGather (done reading)");
    });
  }

  Status Broadcast(Tensor& inout, int root) override {
    TANDEM_RETURN_IF_ERROR(ValidateBuffer(inout, "inout", device()));
    TANDEM_RETURN_IF_ERROR(ValidateRoot(root, size()));
    Slot s = MakeSlot(OpKind::kBroadcast, inout, inout, ReduceOp::kSum);
    s.root = root;
    std::vector<Slot> all;
    return Collective(s, StrCat(BufferLabel(inout), " from root ", root), &all, [&]() -> Status {
      if (rank_ != root) std::memcpy(inout.raw_data(), all[root].in, inout.num_bytes());
      return Phase("Broadcast (done reading)");
    });
  }

  Status Send(const Tensor& t, int peer, int tag) override {
    TANDEM_RETURN_IF_ERROR(ValidateBuffer(t, "t", device()));
    TANDEM_RETURN_IF_ERROR(ValidatePeer(peer, rank_, size(), "Send: peer"));
    TANDEM_RETURN_IF_ERROR(ValidateTag(tag));
    TANDEM_RETURN_IF_ERROR(Enter());
    return group_->Send(rank_, t, peer, tag, Deadline(options_.timeout_s));
  }

  Status Recv(Tensor& t, int peer, int tag) override {
    TANDEM_RETURN_IF_ERROR(ValidateBuffer(t, "t", device()));
    TANDEM_RETURN_IF_ERROR(ValidatePeer(peer, rank_, size(), "Recv: peer"));
    TANDEM_RETURN_IF_ERROR(ValidateTag(tag));
    TANDEM_RETURN_IF_ERROR(Enter());
    return group_->Recv(rank_, t, peer, tag, Deadline(options_.timeout_s));
  }

  Status SendRecv(const Tensor& send, int dst, Tensor& recv, int src, int tag) override {
    TANDEM_RETURN_IF_ERROR(ValidateBuffer(send, "send", device()));
    TANDEM_RETURN_IF_ERROR(ValidateBuffer(recv, "recv", device()));
    TANDEM_RETURN_IF_ERROR(ValidatePeer(dst, rank_, size(), "SendRecv: destination"));
    TANDEM_RETURN_IF_ERROR(ValidatePeer(src, rank_, size(), "SendRecv: source"));
    TANDEM_RETURN_IF_ERROR(ValidateTag(tag));
    TANDEM_RETURN_IF_ERROR(Enter());
    return group_->SendRecv(rank_, send, dst, recv, src, tag, Deadline(options_.timeout_s));
  }

  Status Barrier() override {
    Slot s;
    s.op = OpKind::kBarrier;
    return Collective(s, "", nullptr, nullptr);
  }

  StatusOr<std::unique_ptr<Communicator>> Split(int color, int key, std::string name) override {
    if (color < 0 && color != kNoColor) {
      return InvalidArgumentError(StrCat("Split: color ", color, " must be >= 0 or kNoColor"));
    }
    Slot s;
    s.op = OpKind::kSplit;
    s.color = color;
    s.key = key;
    s.name = name;
    std::vector<Slot> all;
    TANDEM_RETURN_IF_ERROR(Collective(s, StrCat("'", name, "'"), &all, nullptr));
    if (color == kNoColor) return std::unique_ptr<Communicator>();
    return std::unique_ptr<Communicator>(
        new ThreadCommunicator(all[rank_].child, all[rank_].child_rank, options_));
  }

  Status Synchronize() override {
    TANDEM_RETURN_IF_ERROR(Usable());
    return group_->broken();
  }

  Status Abort(std::string reason) override {
    group_->Break(AbortedError(
        StrCat("group '", name(), "' (threads): rank ", rank_, " aborted the group: ", reason)));
    return Status::Ok();
  }

  Status Close() override {
    closed_ = true;
    return Status::Ok();
  }

 private:
  Slot MakeSlot(OpKind op, const Tensor& in, const Tensor& out, ReduceOp reduce) const {
    Slot s;
    s.op = op;
    s.dtype = in.dtype();
    s.reduce = reduce;
    s.in_numel = in.numel();
    s.out_numel = out.numel();
    s.in = in.raw_data();
    s.out = out.raw_data();
    return s;
  }

  // in pointers of every rank, advanced by `in_offset` bytes.
  static std::vector<const void*> Inputs(const std::vector<Slot>& all, int64_t in_offset) {
    std::vector<const void*> ins;
    for (const Slot& s : all) ins.push_back(static_cast<const char*>(s.in) + in_offset);
    return ins;
  }

  Status Usable() const {
    if (closed_) return FailedPreconditionError(StrCat("group '", name(), "' (threads): closed"));
    return Status::Ok();
  }

  // Start of every communicating call: closed check and fault injection.
  Status Enter() {
    TANDEM_RETURN_IF_ERROR(Usable());
    return group_->faults().OnCall(group_->world_ranks()[rank_]);
  }

  // Runs a collective: arrival rendezvous (checks every rank made the same call), then `body`
  // (which ends with the "done reading" phase when it reads peers' buffers).
  Status Collective(const Slot& slot, const std::string& what, std::vector<Slot>* all,
                    const std::function<Status()>& body) {
    TANDEM_RETURN_IF_ERROR(Enter());
    deadline_ = Deadline(options_.timeout_s);
    what_ = StrCat(OpName(slot.op), " #", ++num_collectives_, what.empty() ? "" : " of ", what);
    const std::string label = StrCat("group '", name(), "' (threads): ", what_);
    auto on_complete = [&](std::vector<Slot>& slots) -> Status {
      TANDEM_RETURN_IF_ERROR(CheckSameCall(slots, label));
      if (slot.op == OpKind::kSplit) return MakeChildren(slots, *group_);
      return Status::Ok();
    };
    TANDEM_RETURN_IF_ERROR(group_->Rendezvous(rank_, &slot, deadline_, what_, on_complete, all));
    return body ? body() : Status::Ok();
  }

  // A second rendezvous of the current collective, with its deadline.
  Status Phase(const char* what) {
    return group_->Rendezvous(rank_, nullptr, deadline_, StrCat(what_, ", ", what), nullptr,
                              nullptr);
  }

  std::shared_ptr<GroupState> group_;
  const int rank_;
  const CollectiveOptions options_;
  bool closed_ = false;
  int64_t num_collectives_ = 0;
  Deadline deadline_{0};
  std::string what_;
};

}  // namespace
}  // namespace internal

std::vector<std::unique_ptr<Communicator>> CreateThreadGroup(
    int size, const CollectiveOptions& options, const std::vector<InjectedFault>& faults) {
  TANDEM_CHECK_MSG(size >= 1, "CreateThreadGroup: size ", size, " must be >= 1");
  TANDEM_CHECK_OK(internal::ValidateOptions(options));
  std::vector<int> world(size);
  for (int r = 0; r < size; ++r) world[r] = r;
  auto plan = std::make_shared<internal::FaultPlan>(size, faults);
  auto group = std::make_shared<internal::GroupState>("world", std::move(world), plan);
  std::vector<std::unique_ptr<Communicator>> comms;
  for (int r = 0; r < size; ++r) {
    comms.push_back(std::make_unique<internal::ThreadCommunicator>(group, r, options));
  }
  return comms;
}

}  // namespace tandem::collectives
