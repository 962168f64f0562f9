#include "collectives/internal/mpi_communicator.h"

#include <algorithm>

#include "collectives/internal/host_reduce.h"
#include "collectives/internal/mpi_check.h"
#include "core/logging.h"

namespace tandem::collectives::internal {
namespace {

bool IsHalf(DType d) { return d == DType::kBF16 || d == DType::kF16; }

// Element type for moving data (no arithmetic): halves travel as 16-bit words.
MPI_Datatype MoveType(DType d) {
  switch (d) {
    case DType::kF32:
      return MPI_FLOAT;
    case DType::kBF16:
    case DType::kF16:
      return MPI_UINT16_T;
    case DType::kI32:
      return MPI_INT32_T;
    case DType::kI64:
      return MPI_INT64_T;
    case DType::kU8:
      return MPI_UINT8_T;
  }
  return MPI_BYTE;
}

MPI_Op ToMpiOp(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return MPI_SUM;  // kAvg divides afterwards
    case ReduceOp::kMax:
      return MPI_MAX;
    case ReduceOp::kMin:
      return MPI_MIN;
  }
  return MPI_SUM;
}

// Reductions MPI runs on a wider copy: bf16/f16 in f32 (one rounding at the end), and u8 sums
// in i32, because Open MPI 4.1's AVX kernels saturate 8-bit sums instead of wrapping.
bool Widened(DType d, ReduceOp op) {
  return IsHalf(d) || (d == DType::kU8 && op == ReduceOp::kSum);
}

// The buffer MPI reduces: the tensor itself, or its widened copy.
Tensor ReduceBuffer(const Tensor& t, ReduceOp op, bool copy_values) {
  if (!Widened(t.dtype(), op)) return t;
  if (t.dtype() == DType::kU8) {
    Tensor w = Tensor::Cpu(t.shape(), DType::kI32);
    for (int64_t i = 0; copy_values && i < t.numel(); ++i) {
      w.data<int32_t>()[i] = t.data<uint8_t>()[i];
    }
    return w;
  }
  Tensor f = Tensor::Cpu(t.shape(), DType::kF32);
  if (copy_values) WidenToF32(f.data<float>(), t.raw_data(), t.dtype(), t.numel());
  return f;
}

// Finishes a reduction into `dst` from MPI's buffer `buf`: kAvg division and narrowing.
void FinishReduce(Tensor& dst, Tensor& buf, ReduceOp op, int size) {
  if (op == ReduceOp::kAvg) DivideF32(buf.data<float>(), buf.numel(), static_cast<float>(size));
  if (!Widened(dst.dtype(), op)) return;
  if (dst.dtype() == DType::kU8) {
    for (int64_t i = 0; i < dst.numel(); ++i) {
      dst.data<uint8_t>()[i] = static_cast<uint8_t>(buf.data<int32_t>()[i] & 0xff);
    }
    return;
  }
  NarrowFromF32(dst.raw_data(), buf.data<float>(), dst.dtype(), dst.numel());
}

double GraceSeconds(double timeout_s) { return std::min(1.0, std::max(0.1, 0.25 * timeout_s)); }

}  // namespace

StatusOr<MPI_Comm> DupComm(MPI_Comm comm, const Deadline& deadline, const std::string& what) {
  MPI_Comm out = MPI_COMM_NULL;
  MPI_Request req = MPI_REQUEST_NULL;
  TANDEM_MPI_RETURN_IF_ERROR(MPI_Comm_idup(comm, &out, &req));
  Backoff backoff;
  for (;;) {
    int done = 0;
    TANDEM_MPI_RETURN_IF_ERROR(MPI_Test(&req, &done, MPI_STATUS_IGNORE));
    if (done) return out;
    if (deadline.Expired()) {
      return DeadlineExceededError(StrCat(what, ": MPI_Comm_idup did not complete within ",
                                          deadline.timeout_s(), " s: a rank did not take part"));
    }
    backoff.Pause();
  }
}

MpiCommunicator::MpiCommunicator(MPI_Comm comm, std::string name, const CollectiveOptions& options)
    : comm_(comm), name_(std::move(name)), options_(options) {
  MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &size_);
  MPI_Group group, world;
  MPI_Comm_group(comm_, &group);
  MPI_Comm_group(MPI_COMM_WORLD, &world);
  std::vector<int> ranks(size_);
  for (int r = 0; r < size_; ++r) ranks[r] = r;
  world_ranks_.resize(size_);
  MPI_Group_translate_ranks(group, size_, ranks.data(), world, world_ranks_.data());
  MPI_Group_free(&group);
  MPI_Group_free(&world);
}

StatusOr<std::unique_ptr<MpiCommunicator>> MpiCommunicator::Create(
    MPI_Comm comm, std::string name, const CollectiveOptions& options) {
  std::unique_ptr<MpiCommunicator> c(new MpiCommunicator(comm, std::move(name), options));
  TANDEM_ASSIGN_OR_RETURN(MPI_Comm ctl, DupComm(comm, Deadline(options.timeout_s),
                                                StrCat("creating group '", c->name_, "'")));
  c->ctl_ = std::make_unique<ControlChannel>(ctl, c->world_ranks_, options.track_arrivals);
  return c;
}

MpiCommunicator::~MpiCommunicator() {
  if (!closed_) Close().IgnoreError();
}

int MpiCommunicator::WorldRank(int group_rank) const {
  TANDEM_CHECK(group_rank >= 0 && group_rank < size_);
  return world_ranks_[group_rank];
}

std::string MpiCommunicator::Label() const { return GroupLabel(name_, "mpi", rank_, size_); }

Status MpiCommunicator::Break(const Status& status) {
  if (broken_.ok()) broken_ = status;
  return broken_;
}

Status MpiCommunicator::CheckUsable() {
  if (closed_) return FailedPreconditionError(StrCat(Label(), ": used after Close()"));
  if (!broken_.ok()) {
    return Status(broken_.code(),
                  StrCat(Label(), " is broken by an earlier failure: ", broken_.message()));
  }
  Status notice = ctl_->Service();
  if (!notice.ok()) return Break(Status(notice.code(), StrCat(Label(), ": ", notice.message())));
  return Status::Ok();
}

Status MpiCommunicator::Run(Op op, const std::function<int(MPI_Request*, int*)>& start,
                            MPI_Status* statuses) {
  TANDEM_RETURN_IF_ERROR(CheckUsable());
  int64_t seq = 0;
  if (op.collective) {
    seq = ++num_collectives_;
    op.what = StrCat(OpName(op.kind), " #", seq, op.what.empty() ? "" : " of ", op.what);
    ctl_->Arrive(seq);
  }
  const Deadline deadline(options_.timeout_s);
  MPI_Request reqs[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
  int n = 0;
  const int rc = start(reqs, &n);
  if (rc != MPI_SUCCESS) {
    Status s = InternalError(StrCat(Label(), ": starting ", op.what, ": ", MpiErrorString(rc)));
    ctl_->NotifyAbort(s);
    return Break(s);
  }
  return Wait(op, reqs, n, statuses, seq, deadline);
}

Status MpiCommunicator::Wait(Op& op, MPI_Request* reqs, int n, MPI_Status* statuses, int64_t seq,
                             const Deadline& deadline) {
  MPI_Status local[2];
  MPI_Status* st = statuses ? statuses : local;
  Status error;
  auto test = [&]() {
    int done = 0;
    const int rc = MPI_Testall(n, reqs, &done, st);
    if (rc != MPI_SUCCESS) {
      int code = rc;
      for (int i = 0; rc == MPI_ERR_IN_STATUS && i < n; ++i) {
        if (st[i].MPI_ERROR != MPI_SUCCESS) code = st[i].MPI_ERROR;
      }
      error = InternalError(StrCat(Label(), ": ", op.what, " failed: ", MpiErrorString(code)));
      return true;
    }
    return done != 0;
  };
  auto abandon = [&](const Status& s, bool notify) {
    for (Tensor& t : op.hold) orphan_buffers_.push_back(t);
    if (notify) ctl_->NotifyAbort(s);
    return Break(s);
  };
  Backoff backoff;
  for (int64_t round = 0;; ++round) {
    if (test()) return error.ok() ? Status::Ok() : abandon(error, true);
    if (round % 16 == 15) {
      Status notice = ctl_->Service();
      if (!notice.ok()) {
        return abandon(
            Status(notice.code(), StrCat(Label(), ": ", op.what, " abandoned: ", notice.message())),
            false);
      }
    }
    if (deadline.Expired()) break;
    backoff.Pause();
  }
  std::string why;
  if (op.collective) {
    auto d = ctl_->DiagnoseMissing(seq, GraceSeconds(options_.timeout_s),
                                   [&] { return test() && error.ok(); });
    if (d.completed) return Status::Ok();
    why = d.text;
  } else {
    why = StrCat("peer rank ", RankList(op.peers, world_ranks_), " did not take part");
  }
  return abandon(DeadlineExceededError(StrCat(Label(), ": ", op.what, " did not complete within ",
                                              options_.timeout_s, " s: ", why)),
                 true);
}

Status MpiCommunicator::AllReduce(Tensor& inout, ReduceOp op) {
  TANDEM_RETURN_IF_ERROR(ValidateAllReduce(inout, op, device()));
  Tensor buf = ReduceBuffer(inout, op, true);
  const int n = static_cast<int>(inout.numel());
  TANDEM_RETURN_IF_ERROR(
      Run({OpKind::kAllReduce, StrCat(BufferLabel(inout), ", ", ReduceOpName(op)), true, {}, {buf}},
          [&](MPI_Request* r, int* k) {
            *k = 1;
            return MPI_Iallreduce(MPI_IN_PLACE, buf.raw_data(), n, MoveType(buf.dtype()),
                                  ToMpiOp(op), comm_, r);
          }));
  FinishReduce(inout, buf, op, size_);
  return Status::Ok();
}

Status MpiCommunicator::ReduceScatter(Tensor& out, const Tensor& in, ReduceOp op) {
  TANDEM_RETURN_IF_ERROR(ValidateReduceScatter(out, in, op, size_, device()));
  Tensor in_buf = ReduceBuffer(in, op, true);
  Tensor out_buf = ReduceBuffer(out, op, false);
  const int n = static_cast<int>(out.numel());
  TANDEM_RETURN_IF_ERROR(
      Run({OpKind::kReduceScatter,
           StrCat(BufferLabel(in), " -> ", BufferLabel(out), ", ", ReduceOpName(op)),
           true,
           {},
           {in_buf, out_buf}},
          [&](MPI_Request* r, int* k) {
            *k = 1;
            return MPI_Ireduce_scatter_block(in_buf.raw_data(), out_buf.raw_data(), n,
                                             MoveType(in_buf.dtype()), ToMpiOp(op), comm_, r);
          }));
  FinishReduce(out, out_buf, op, size_);
  return Status::Ok();
}

Status MpiCommunicator::AllGather(Tensor& out, const Tensor& in) {
  bool in_place = false;
  TANDEM_RETURN_IF_ERROR(ValidateAllGather(out, in, rank_, size_, device(), &in_place));
  const int n = static_cast<int>(in.numel());
  const MPI_Datatype type = MoveType(in.dtype());
  return Run(
      {OpKind::kAllGather, StrCat(BufferLabel(in), " -> ", BufferLabel(out)), true, {}, {in, out}},
      [&](MPI_Request* r, int* k) {
        *k = 1;
        return MPI_Iallgather(in_place ? MPI_IN_PLACE : in.raw_data(), n, type, out.raw_data(), n,
                              type, comm_, r);
      });
}

Status MpiCommunicator::Broadcast(Tensor& inout, int root) {
  TANDEM_RETURN_IF_ERROR(ValidateBuffer(inout, "inout", device()));
  TANDEM_RETURN_IF_ERROR(ValidateRoot(root, size_));
  const int n = static_cast<int>(inout.numel());
  return Run(
      {OpKind::kBroadcast, StrCat(BufferLabel(inout), " from root ", root), true, {}, {inout}},
      [&](MPI_Request* r, int* k) {
        *k = 1;
        return MPI_Ibcast(inout.raw_data(), n, MoveType(inout.dtype()), root, comm_, r);
      });
}

Status MpiCommunicator::Barrier() {
  return Run({OpKind::kBarrier, "", true, {}, {}}, [&](MPI_Request* r, int* k) {
    *k = 1;
    return MPI_Ibarrier(comm_, r);
  });
}

Status MpiCommunicator::CheckReceived(const MPI_Status& st, const Tensor& t, int peer) const {
  int count = 0;
  MPI_Get_count(&st, MoveType(t.dtype()), &count);
  if (count == t.numel()) return Status::Ok();
  return InvalidArgumentError(StrCat(Label(), ": Recv from rank ", peer, " expected ",
                                     BufferLabel(t), ", the message held ", count, " elements"));
}

Status MpiCommunicator::Send(const Tensor& t, int peer, int tag) {
  TANDEM_RETURN_IF_ERROR(ValidateBuffer(t, "t", device()));
  TANDEM_RETURN_IF_ERROR(ValidatePeer(peer, rank_, size_, "Send: peer"));
  TANDEM_RETURN_IF_ERROR(ValidateTag(tag));
  const int n = static_cast<int>(t.numel());
  return Run({OpKind::kSend,
              StrCat("Send of ", BufferLabel(t), " to rank ", peer, " (tag ", tag, ")"),
              false,
              {peer},
              {t}},
             [&](MPI_Request* r, int* k) {
               *k = 1;
               return MPI_Issend(t.raw_data(), n, MoveType(t.dtype()), peer, tag, comm_, r);
             });
}

Status MpiCommunicator::Recv(Tensor& t, int peer, int tag) {
  TANDEM_RETURN_IF_ERROR(ValidateBuffer(t, "t", device()));
  TANDEM_RETURN_IF_ERROR(ValidatePeer(peer, rank_, size_, "Recv: peer"));
  TANDEM_RETURN_IF_ERROR(ValidateTag(tag));
  const int n = static_cast<int>(t.numel());
  MPI_Status st[2];
  TANDEM_RETURN_IF_ERROR(Run(
      {OpKind::kRecv,
       StrCat("Recv of ", BufferLabel(t), " from rank ", peer, " (tag ", tag, ")"),
       false,
       {peer},
       {t}},
      [&](MPI_Request* r, int* k) {
        *k = 1;
        return MPI_Irecv(t.raw_data(), n, MoveType(t.dtype()), peer, tag, comm_, r);
      },
      st));
  Status s = CheckReceived(st[0], t, peer);
  return s.ok() ? s : Break(s);
}

Status MpiCommunicator::SendRecv(const Tensor& send, int dst, Tensor& recv, int src, int tag) {
  TANDEM_RETURN_IF_ERROR(ValidateBuffer(send, "send", device()));
  TANDEM_RETURN_IF_ERROR(ValidateBuffer(recv, "recv", device()));
  TANDEM_RETURN_IF_ERROR(ValidatePeer(dst, rank_, size_, "SendRecv: destination"));
  TANDEM_RETURN_IF_ERROR(ValidatePeer(src, rank_, size_, "SendRecv: source"));
  TANDEM_RETURN_IF_ERROR(ValidateTag(tag));
  MPI_Status st[2];
  TANDEM_RETURN_IF_ERROR(Run(
      {OpKind::kSendRecv,
       StrCat("SendRecv of ", BufferLabel(send), " to rank ", dst, " and ", BufferLabel(recv),
              " from rank ", src, " (tag ", tag, ")"),
       false,
       dst == src ? std::vector<int>{dst} : std::vector<int>{dst, src},
       {send, recv}},
      [&](MPI_Request* r, int* k) {
        *k = 2;
        const int rc = MPI_Irecv(recv.raw_data(), static_cast<int>(recv.numel()),
                                 MoveType(recv.dtype()), src, tag, comm_, &r[1]);
        if (rc != MPI_SUCCESS) return rc;
        return MPI_Issend(send.raw_data(), static_cast<int>(send.numel()), MoveType(send.dtype()),
                          dst, tag, comm_, &r[0]);
      },
      st));
  Status s = CheckReceived(st[1], recv, src);
  return s.ok() ? s : Break(s);
}

StatusOr<std::unique_ptr<Communicator>> MpiCommunicator::Split(int color, int key,
                                                               std::string name) {
  if (color < 0 && color != kNoColor) {
    return InvalidArgumentError(StrCat("Split: color ", color, " must be >= 0 or kNoColor"));
  }
  // A timed exchange first, so a missing rank is reported instead of hanging MPI_Comm_split.
  Tensor mine = Tensor::Cpu({2}, DType::kI32);
  Tensor all = Tensor::Cpu({2 * size_}, DType::kI32);
  mine.data<int32_t>()[0] = color;
  mine.data<int32_t>()[1] = key;
  TANDEM_RETURN_IF_ERROR(Run({OpKind::kSplit, StrCat("'", name, "'"), true, {}, {mine, all}},
                             [&](MPI_Request* r, int* k) {
                               *k = 1;
                               return MPI_Iallgather(mine.raw_data(), 2, MPI_INT32_T,
                                                     all.raw_data(), 2, MPI_INT32_T, comm_, r);
                             }));
  MPI_Comm child = MPI_COMM_NULL;
  const int rc = MPI_Comm_split(comm_, color == kNoColor ? MPI_UNDEFINED : color, key, &child);
  if (rc != MPI_SUCCESS) {
    return Break(InternalError(StrCat(Label(), ": MPI_Comm_split: ", MpiErrorString(rc))));
  }
  if (color == kNoColor) return std::unique_ptr<Communicator>();
  TANDEM_ASSIGN_OR_RETURN(auto c, Create(child, std::move(name), options_));
  return std::unique_ptr<Communicator>(std::move(c));
}

Status MpiCommunicator::Synchronize() { return CheckUsable(); }

Status MpiCommunicator::Abort(std::string reason) {
  if (closed_ || !broken_.ok()) return Status::Ok();
  Status s = AbortedError(StrCat(Label(), ": rank ", rank_, " aborted the group: ", reason));
  ctl_->NotifyAbort(s);
  Break(s).IgnoreError();
  return Status::Ok();
}

Status MpiCommunicator::Close() {
  if (closed_) return Status::Ok();
  closed_ = true;
  if (!MpiActive()) return Status::Ok();  // MPI already finalized: nothing can be released
  const bool healthy = broken_.ok();
  if (ctl_) ctl_->Release(healthy, Deadline(std::min(options_.timeout_s, 10.0)));
  if (!healthy) {
    // Peers' abandoned operations may still send to this group, and MPI keeps progressing our
    // own: freeing the communicator would let those messages reach a later communicator that
    // reuses its context id (Open MPI), and freeing buffers would let MPI write freed memory.
    // A broken group therefore keeps its communicator and buffers until exit.
    if (!orphan_buffers_.empty()) new std::vector<Tensor>(std::move(orphan_buffers_));
    TANDEM_LOG(WARNING, "collectives") << Label() << ": closed after a failure; its MPI "
                                       << "communicator is kept, unused, until exit";
    comm_ = MPI_COMM_NULL;
    return Status::Ok();
  }
  MPI_Comm_free(&comm_);
  return Status::Ok();
}

StatusOr<std::unique_ptr<ControlChannel>> MpiCommunicator::DupControlChannel(bool track_arrivals) {
  TANDEM_RETURN_IF_ERROR(CheckUsable());
  TANDEM_ASSIGN_OR_RETURN(MPI_Comm ctl, DupComm(comm_, Deadline(options_.timeout_s),
                                                StrCat(Label(), ": control channel")));
  return std::make_unique<ControlChannel>(ctl, world_ranks_, track_arrivals);
}

}  // namespace tandem::collectives::internal
