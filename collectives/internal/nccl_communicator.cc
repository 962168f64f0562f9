// The NCCL backend's operations: enqueue on the stream, track completion and deadlines.
#include "collectives/internal/nccl_communicator.h"

#if defined(TANDEM_WITH_NCCL)

#include <algorithm>

#include "collectives/internal/nccl_check.h"

namespace tandem::collectives::internal {

ncclDataType_t NcclType(DType d) {
  switch (d) {
    case DType::kF32:
      return ncclFloat32;
    case DType::kBF16:
      return ncclBfloat16;
    case DType::kF16:
      return ncclFloat16;
    case DType::kI32:
      return ncclInt32;
    case DType::kI64:
      return ncclInt64;
    case DType::kU8:
      return ncclUint8;
  }
  return ncclUint8;
}

ncclRedOp_t NcclOp(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kMax:
      return ncclMax;
    case ReduceOp::kMin:
      return ncclMin;
    case ReduceOp::kAvg:
      return ncclAvg;
  }
  return ncclSum;
}

double GraceSeconds(double timeout_s) { return std::min(1.0, std::max(0.1, 0.25 * timeout_s)); }

Status WaitReady(ncclComm_t comm, const Deadline& deadline, const std::string& what) {
  Backoff backoff;
  for (;;) {
    ncclResult_t state = ncclSuccess;
    TANDEM_NCCL_RETURN_IF_ERROR(ncclCommGetAsyncError(comm, &state), comm);
    if (state == ncclSuccess) return Status::Ok();
    if (state != ncclInProgress) {
      return InternalError(StrCat(what, ": NCCL error ", ncclGetErrorString(state), " (",
                                  ncclGetLastError(comm), ")"));
    }
    if (deadline.Expired()) {
      return DeadlineExceededError(
          StrCat(what, " did not complete within ", deadline.timeout_s(), " s"));
    }
    backoff.Pause();
  }
}

Status NcclCommunicator::Enqueue(OpKind kind, std::string what, std::vector<int> peers,
                                 std::vector<Tensor> hold,
                                 const std::function<ncclResult_t()>& issue) {
  TANDEM_RETURN_IF_ERROR(CheckUsable());
  TANDEM_RETURN_IF_ERROR(Progress(/*block=*/false));
  int64_t seq = 0;
  if (peers.empty()) {
    seq = ++num_collectives_;
    what = StrCat(OpName(kind), " #", seq, what.empty() ? "" : " of ", what);
    if (s_.ctl) s_.ctl->Arrive(seq);
  }
  Deadline deadline(s_.options.timeout_s);
  DeviceGuard guard(s_.device);
  const ncclResult_t r = issue();
  if (r != ncclSuccess && r != ncclInProgress) {
    return Fail(InternalError(StrCat(Label(), ": ", what, ": ", ncclGetErrorString(r), " (",
                                     ncclGetLastError(comm_), ")")),
                true);
  }
  if (r == ncclInProgress) {
    // Host-side work (e.g. connecting to peers on first use) is still running.
    Status ready = WaitReady(comm_, deadline, StrCat(Label(), ": enqueueing ", what));
    if (ready.code() == StatusCode::kDeadlineExceeded) {
      ready = TimedOut(what, seq, peers, [&] {
        ncclResult_t state = ncclInProgress;
        ncclCommGetAsyncError(comm_, &state);
        return state == ncclSuccess;
      });
    }
    if (!ready.ok()) return Fail(ready, true);
  }
  auto event = CudaEventOwner::Create(s_.device, /*timing=*/false);
  if (!event.ok()) return Fail(event.status(), true);
  Status recorded = event->Record(stream_);
  if (!recorded.ok()) return Fail(recorded, true);
  pending_.push_back(Pending{std::move(*event), std::move(hold), std::move(what), seq,
                             std::move(peers), deadline});
  return Status::Ok();
}

Status NcclCommunicator::TimedOut(const std::string& what, int64_t seq,
                                  const std::vector<int>& peers,
                                  const std::function<bool()>& completed) {
  std::string why;
  if (seq > 0 && s_.ctl) {
    auto d = s_.ctl->DiagnoseMissing(seq, GraceSeconds(s_.options.timeout_s), completed);
    if (d.completed) return Status::Ok();
    why = d.text;
  } else if (seq > 0) {
    why = "the missing ranks are unknown (no MPI control channel)";
  } else {
    why = StrCat("peer rank ", RankList(peers, s_.world_ranks), " did not take part");
  }
  return DeadlineExceededError(StrCat(Label(), ": ", what, " did not complete within ",
                                      s_.options.timeout_s, " s: ", why,
                                      "; the NCCL communicator was aborted"));
}

Status NcclCommunicator::Progress(bool block) {
  Backoff backoff;
  while (!pending_.empty()) {
    Pending& p = pending_.front();
    const cudaError_t e = cudaEventQuery(p.done.get());
    if (e == cudaSuccess) {
      pending_.pop_front();
      continue;
    }
    if (e != cudaErrorNotReady) {
      return Fail(InternalError(StrCat(Label(), ": ", p.what, ": CUDA error ", cudaGetErrorName(e),
                                       " (", cudaGetErrorString(e), ")")),
                  true);
    }
    ncclResult_t async = ncclSuccess;
    ncclCommGetAsyncError(comm_, &async);
    if (async != ncclSuccess && async != ncclInProgress) {
      return Fail(
          InternalError(StrCat(Label(), ": ", p.what, ": NCCL error ", ncclGetErrorString(async),
                               " (", ncclGetLastError(comm_), ")")),
          true);
    }
    TANDEM_RETURN_IF_ERROR(CheckUsable());  // a peer's abort notice
    if (p.deadline.Expired()) {
      Status timed_out = TimedOut(p.what, p.seq, p.peers,
                                  [&] { return cudaEventQuery(p.done.get()) == cudaSuccess; });
      if (timed_out.ok()) continue;  // finished while we asked who was missing
      return Fail(timed_out, true);
    }
    if (!block) return Status::Ok();
    backoff.Pause();
  }
  return Status::Ok();
}

Status NcclCommunicator::AllReduce(Tensor& inout, ReduceOp op) {
  TANDEM_RETURN_IF_ERROR(ValidateAllReduce(inout, op, device()));
  return Enqueue(OpKind::kAllReduce, StrCat(BufferLabel(inout), ", ", ReduceOpName(op)), {},
                 {inout}, [&] {
                   return ncclAllReduce(inout.raw_data(), inout.raw_data(), inout.numel(),
                                        NcclType(inout.dtype()), NcclOp(op), comm_, stream_);
                 });
}

Status NcclCommunicator::ReduceScatter(Tensor& out, const Tensor& in, ReduceOp op) {
  TANDEM_RETURN_IF_ERROR(ValidateReduceScatter(out, in, op, s_.size, device()));
  return Enqueue(OpKind::kReduceScatter,
                 StrCat(BufferLabel(in), " -> ", BufferLabel(out), ", ", ReduceOpName(op)), {},
                 {in, out}, [&] {
                   return ncclReduceScatter(in.raw_data(), out.raw_data(), out.numel(),
                                            NcclType(in.dtype()), NcclOp(op), comm_, stream_);
                 });
}

Status NcclCommunicator::AllGather(Tensor& out, const Tensor& in) {
  bool in_place = false;
  TANDEM_RETURN_IF_ERROR(ValidateAllGather(out, in, s_.rank, s_.size, device(), &in_place));
  return Enqueue(OpKind::kAllGather, StrCat(BufferLabel(in), " -> ", BufferLabel(out)), {},
                 {in, out}, [&] {
                   return ncclAllGather(in.raw_data(), out.raw_data(), in.numel(),
                                        NcclType(in.dtype()), comm_, stream_);
                 });
}

Status NcclCommunicator::Broadcast(Tensor& inout, int root) {
  TANDEM_RETURN_IF_ERROR(ValidateBuffer(inout, "inout", device()));
  TANDEM_RETURN_IF_ERROR(ValidateRoot(root, s_.size));
  return Enqueue(OpKind::kBroadcast, StrCat(BufferLabel(inout), " from root ", root), {}, {inout},
                 [&] {
                   return ncclBroadcast(inout.raw_data(), inout.raw_data(), inout.numel(),
                                        NcclType(inout.dtype()), root, comm_, stream_);
                 });
}

Status NcclCommunicator::Send(const Tensor& t, int peer, int tag) {
  TANDEM_RETURN_IF_ERROR(ValidateBuffer(t, "t", device()));
  TANDEM_RETURN_IF_ERROR(ValidatePeer(peer, s_.rank, s_.size, "Send: peer"));
  return Enqueue(
      OpKind::kSend, StrCat("Send of ", BufferLabel(t), " to rank ", peer), {peer}, {t},
      [&] { return ncclSend(t.raw_data(), t.numel(), NcclType(t.dtype()), peer, comm_, stream_); });
}

Status NcclCommunicator::Recv(Tensor& t, int peer, int tag) {
  TANDEM_RETURN_IF_ERROR(ValidateBuffer(t, "t", device()));
  TANDEM_RETURN_IF_ERROR(ValidatePeer(peer, s_.rank, s_.size, "Recv: peer"));
  return Enqueue(
      OpKind::kRecv, StrCat("Recv of ", BufferLabel(t), " from rank ", peer), {peer}, {t},
      [&] { return ncclRecv(t.raw_data(), t.numel(), NcclType(t.dtype()), peer, comm_, stream_); });
}

Status NcclCommunicator::SendRecv(const Tensor& send, int dst, Tensor& recv, int src, int tag) {
  TANDEM_RETURN_IF_ERROR(ValidateBuffer(send, "send", device()));
  TANDEM_RETURN_IF_ERROR(ValidateBuffer(recv, "recv", device()));
  TANDEM_RETURN_IF_ERROR(ValidatePeer(dst, s_.rank, s_.size, "SendRecv: destination"));
  TANDEM_RETURN_IF_ERROR(ValidatePeer(src, s_.rank, s_.size, "SendRecv: source"));
  std::vector<int> peers = dst == src ? std::vector<int>{dst} : std::vector<int>{dst, src};
  return Enqueue(
      OpKind::kSendRecv,
      StrCat("SendRecv of ", BufferLabel(send), " to rank ", dst, " and ", BufferLabel(recv),
             " from rank ", src),
      std::move(peers), {send, recv}, [&] {
        ncclGroupStart();
        ncclSend(send.raw_data(), send.numel(), NcclType(send.dtype()), dst, comm_, stream_);
        ncclRecv(recv.raw_data(), recv.numel(), NcclType(recv.dtype()), src, comm_, stream_);
        return ncclGroupEnd();
      });
}

Status NcclCommunicator::Barrier() {
  TANDEM_RETURN_IF_ERROR(Enqueue(OpKind::kBarrier, "", {}, {}, [&] {
    return ncclAllReduce(scratch_, scratch_, 1, ncclInt32, ncclSum, comm_, stream_);
  }));
  return Progress(/*block=*/true);
}

Status NcclCommunicator::Synchronize() {
  TANDEM_RETURN_IF_ERROR(CheckUsable());
  return Progress(/*block=*/true);
}

}  // namespace tandem::collectives::internal

#endif  // TANDEM_WITH_NCCL
