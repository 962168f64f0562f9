// Pieces every backend shares: operation names, argument validation, deadlines, polling backoff
// and the wording of errors.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "collectives/communicator.h"
#include "core/tensor.h"

namespace tandem::collectives::internal {

enum class OpKind : int {
  kAllReduce = 1,
  kReduceScatter,
  kAllGather,
  kBroadcast,
  kBarrier,
  kSplit,
  kSend,
  kRecv,
  kSendRecv,
  kCreate,
  kSynchronize,
};
const char* OpName(OpKind op);

// Steady-clock deadline `timeout_s` from now.
class Deadline {
 public:
  explicit Deadline(double timeout_s);
  bool Expired() const { return std::chrono::steady_clock::now() >= at_; }
  double SecondsLeft() const;
  std::chrono::steady_clock::time_point at() const { return at_; }
  double timeout_s() const { return timeout_s_; }

 private:
  double timeout_s_;
  std::chrono::steady_clock::time_point at_;
};

// Paces a polling loop: yields the CPU for the first 250 ms (MPI progresses transfers only
// inside its calls, so sleeping would slow them), then sleeps 50 us, and 1 ms after 2 s (a rank
// waiting for a late peer must not burn the core that peer may need).
class Backoff {
 public:
  void Pause();

 private:
  int64_t rounds_ = 0;  // calls so far
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

// Identifies a group in errors: "group 'dp' (mpi, rank 1 of 4)".
std::string GroupLabel(const std::string& name, const char* backend, int rank, int size);
// "1 (world 5), 3 (world 7)" from group ranks and their world ranks.
std::string RankList(const std::vector<int>& group_ranks, const std::vector<int>& world_ranks);
// "f32[1000003]".
std::string BufferLabel(const Tensor& t);

// Checks done before anything is sent; all return InvalidArgument naming the tensor.
bool SupportedDType(DType dtype);
Status ValidateBuffer(const Tensor& t, const char* what, Device device);
Status ValidateReduce(DType dtype, ReduceOp op);
Status ValidateAllReduce(const Tensor& inout, ReduceOp op, Device device);
Status ValidateReduceScatter(const Tensor& out, const Tensor& in, ReduceOp op, int size,
                             Device device);
// Sets *in_place when `in` is exactly chunk `rank` of `out`.
Status ValidateAllGather(const Tensor& out, const Tensor& in, int rank, int size, Device device,
                         bool* in_place);
Status ValidatePeer(int peer, int rank, int size, const char* what);
Status ValidateRoot(int root, int size);
Status ValidateTag(int tag);
Status ValidateOptions(const CollectiveOptions& options);

// True when the byte ranges of the two tensors overlap.
bool Overlaps(const Tensor& a, const Tensor& b);

}  // namespace tandem::collectives::internal
