#include "collectives/internal/common.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <thread>

namespace tandem::collectives {

const char* ReduceOpName(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return "sum";
    case ReduceOp::kMax:
      return "max";
    case ReduceOp::kMin:
      return "min";
    case ReduceOp::kAvg:
      return "avg";
  }
  return "?";
}

namespace internal {

const char* OpName(OpKind op) {
  switch (op) {
    case OpKind::kAllReduce:
      return "AllReduce";
    case OpKind::kReduceScatter:
      return "ReduceScatter";
    case OpKind::kAllGather:
      return "AllGather";
    case OpKind::kBroadcast:
      return "Broadcast";
    case OpKind::kBarrier:
      return "Barrier";
    case OpKind::kSplit:
      return "Split";
    case OpKind::kSend:
      return "Send";
    case OpKind::kRecv:
      return "Recv";
    case OpKind::kSendRecv:
      return "SendRecv";
    case OpKind::kCreate:
      return "Create";
    case OpKind::kSynchronize:
      return "Synchronize";
  }
  return "?";
}

Deadline::Deadline(double timeout_s)
    : timeout_s_(timeout_s),
      at_(std::chrono::steady_clock::now() +
          std::chrono::duration_cast<std::chrono::steady_clock::duration>(
              std::chrono::duration<double>(std::max(0.0, timeout_s)))) {}

double Deadline::SecondsLeft() const {
  return std::chrono::duration<double>(at_ - std::chrono::steady_clock::now()).count();
}

void Backoff::Pause() {
  ++rounds_;
  const double waited_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  // MPI moves data only inside its calls, so while a transfer may be running the loop only
  // yields (other ranks sharing the core still run). A wait this long is a late peer: sleep.
  if (waited_s < 0.25) {
    std::this_thread::yield();
    return;
  }
  std::this_thread::sleep_for(std::chrono::microseconds(waited_s < 2.0 ? 50 : 1000));
}

std::string GroupLabel(const std::string& name, const char* backend, int rank, int size) {
  return StrCat("group '", name, "' (", backend, ", rank ", rank, " of ", size, ")");
}

std::string RankList(const std::vector<int>& group_ranks, const std::vector<int>& world_ranks) {
  std::string out;
  for (size_t i = 0; i < group_ranks.size(); ++i) {
    const int r = group_ranks[i];
    if (i) out += ", ";
    out += std::to_string(r);
    if (r >= 0 && r < static_cast<int>(world_ranks.size()) && world_ranks[r] != r) {
      out += StrCat(" (world ", world_ranks[r], ")");
    }
  }
  return out;
}

std::string BufferLabel(const Tensor& t) {
  return StrCat(DTypeName(t.dtype()), ShapeToString(t.shape()));
}

bool SupportedDType(DType dtype) {
  switch (dtype) {
    case DType::kF32:
    case DType::kBF16:
    case DType::kF16:
    case DType::kI32:
    case DType::kI64:
    case DType::kU8:
      return true;
  }
  return false;
}

Status ValidateBuffer(const Tensor& t, const char* what, Device device) {
  if (!t.defined()) return InvalidArgumentError(StrCat("tensor '", what, "': undefined"));
  if (t.device() != device) {
    return InvalidArgumentError(StrCat("tensor '", what, "': expected a tensor on ",
                                       device.ToString(), ", found ", t.DebugString()));
  }
  if (!t.is_contiguous()) {
    return InvalidArgumentError(
        StrCat("tensor '", what, "': expected a contiguous tensor, found ", t.DebugString()));
  }
  if (!SupportedDType(t.dtype())) {
    return InvalidArgumentError(StrCat("tensor '", what, "': dtype ", DTypeName(t.dtype()),
                                       " not supported (f32, bf16, f16, i32, i64, u8)"));
  }
  if (t.numel() > std::numeric_limits<int32_t>::max()) {
    return InvalidArgumentError(StrCat("tensor '", what, "': ", t.numel(),
                                       " elements, more than the 2^31-1 one call can move"));
  }
  return Status::Ok();
}

Status ValidateReduce(DType dtype, ReduceOp op) {
  if (op == ReduceOp::kAvg && !IsFloating(dtype)) {
    return InvalidArgumentError(
        StrCat("ReduceOp avg needs a floating dtype (f32, bf16, f16), found ", DTypeName(dtype)));
  }
  return Status::Ok();
}

Status ValidateAllReduce(const Tensor& inout, ReduceOp op, Device device) {
  TANDEM_RETURN_IF_ERROR(ValidateBuffer(inout, "inout", device));
  return ValidateReduce(inout.dtype(), op);
}

Status ValidateReduceScatter(const Tensor& out, const Tensor& in, ReduceOp op, int size,
                             Device device) {
  TANDEM_RETURN_IF_ERROR(ValidateBuffer(out, "out", device));
  TANDEM_RETURN_IF_ERROR(ValidateBuffer(in, "in", device));
  TANDEM_RETURN_IF_ERROR(ValidateReduce(in.dtype(), op));
  if (out.dtype() != in.dtype()) {
    return InvalidArgumentError(StrCat("ReduceScatter: 'out' is ", BufferLabel(out), ", 'in' is ",
                                       BufferLabel(in), ": dtypes must match"));
  }
  if (in.numel() != out.numel() * size) {
    return InvalidArgumentError(StrCat("ReduceScatter: 'in' must hold size (", size,
                                       ") x 'out' elements = ", out.numel() * size, ", found ",
                                       BufferLabel(in), " and 'out' ", BufferLabel(out)));
  }
  if (Overlaps(out, in)) return InvalidArgumentError("ReduceScatter: 'out' overlaps 'in'");
  return Status::Ok();
}

Status ValidateAllGather(const Tensor& out, const Tensor& in, int rank, int size, Device device,
                         bool* in_place) {
  TANDEM_RETURN_IF_ERROR(ValidateBuffer(out, "out", device));
  TANDEM_RETURN_IF_ERROR(ValidateBuffer(in, "in", device));
  if (out.dtype() != in.dtype()) {
    return InvalidArgumentError(StrCat("AllGather: 'out' is ", BufferLabel(out), ", 'in' is ",
                                       BufferLabel(in), ": dtypes must match"));
  }
  if (out.numel() != in.numel() * size) {
    return InvalidArgumentError(StrCat("AllGather: 'out' must hold size (", size,
                                       ") x 'in' elements = ", in.numel() * size, ", found ",
                                       BufferLabel(out), " and 'in' ", BufferLabel(in)));
  }
  const char* chunk = static_cast<const char*>(out.raw_data()) + rank * in.num_bytes();
  *in_place = in.raw_data() == chunk;
  if (!*in_place && Overlaps(out, in)) {
    return InvalidArgumentError(
        "AllGather: 'in' overlaps 'out' but is not chunk rank() of it (the in-place form)");
  }
  return Status::Ok();
}

Status ValidatePeer(int peer, int rank, int size, const char* what) {
  if (peer < 0 || peer >= size) {
    return InvalidArgumentError(StrCat(what, " rank ", peer, " outside the group [0, ", size, ")"));
  }
  if (peer == rank) return InvalidArgumentError(StrCat(what, " rank ", peer, " is this rank"));
  return Status::Ok();
}

Status ValidateRoot(int root, int size) {
  if (root < 0 || root >= size) {
    return InvalidArgumentError(
        StrCat("Broadcast root ", root, " outside the group [0, ", size, ")"));
  }
  return Status::Ok();
}

Status ValidateTag(int tag) {
  if (tag < 0 || tag > 32767) {
    return InvalidArgumentError(StrCat("tag ", tag, " outside [0, 32767]"));
  }
  return Status::Ok();
}

Status ValidateOptions(const CollectiveOptions& options) {
  if (!(options.timeout_s > 0) || !std::isfinite(options.timeout_s)) {
    return InvalidArgumentError(StrCat(
        "CollectiveOptions::timeout_s must be a finite number > 0, found ", options.timeout_s));
  }
  return Status::Ok();
}

bool Overlaps(const Tensor& a, const Tensor& b) {
  if (a.num_bytes() == 0 || b.num_bytes() == 0) return false;
  const char* a0 = static_cast<const char*>(a.raw_data());
  const char* b0 = static_cast<const char*>(b.raw_data());
  return a0 < b0 + b.num_bytes() && b0 < a0 + a.num_bytes();
}

}  // namespace internal
}  // namespace tandem::collectives
