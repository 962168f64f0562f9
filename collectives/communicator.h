// Communicator: one group of ranks that exchange tensors (all-reduce, reduce-scatter, all-gather,
// broadcast, send/recv), with a timeout on every blocking call.
//
// Three implementations share this interface:
//   - MPI (collectives/mpi.h): host tensors, one process per rank, started by mpirun;
//   - NCCL (collectives/nccl.h): device tensors, bootstrapped over a host communicator;
//   - threads (collectives/thread_group.h): N communicators in one process, one per thread,
//     for unit tests of parallel code, with deterministic fault injection.
//
//   TANDEM_ASSIGN_OR_RETURN(MpiRuntime mpi, MpiRuntime::Init(&argc, &argv));
//   TANDEM_ASSIGN_OR_RETURN(auto world, CreateMpiWorld({.timeout_s = 30}));
//   TANDEM_ASSIGN_OR_RETURN(auto tp, world->Split(world->rank() / 2, world->rank(), "tp"));
//   TANDEM_RETURN_IF_ERROR(tp->AllReduce(grad, ReduceOp::kSum));   // grad: f32[N] on the host
//
// Contracts shared by every implementation:
//   - Every rank of a group calls the same collectives in the same order with matching dtypes
//     and sizes. Tensors must be contiguous and live on the communicator's device (host for MPI
//     and threads, cuda:N for NCCL). Supported dtypes: f32, bf16, f16, i32, i64, u8.
//   - Reductions of bf16/f16 accumulate in f32 on MPI and threads (rounded once at the end); NCCL
//     reduces them natively (see collectives/README.md). kAvg needs a floating dtype; integer sums
//     wrap around.
//   - Every blocking call gives up after CollectiveOptions::timeout_s and returns
//     DeadlineExceeded naming the group, the operation and, where known, the ranks that did not
//     arrive. Argument errors found before anything is sent (InvalidArgument) leave the group
//     usable. Any other failure (timeout, Abort by any rank, a library error) breaks the group
//     for good: every later call fails fast with the first error, so a group never hangs twice.
//     Recovery means new communicators (in practice, a relaunched job).
//   - Host communicators finish each call before returning. NCCL calls enqueue on stream() and
//     return; results are ready after Synchronize() (or for work ordered after stream()). The
//     communicator keeps the tensors of unfinished operations alive.
//
// Ownership: a Communicator owns its library handle (MPI_Comm, ncclComm_t). Close() releases it
// cleanly; destructors never call NCCL (an NCCL communicator destroyed without Close() or Abort()
// leaks its handle and logs a warning).
// Thread-safety: one thread at a time per communicator; different communicators may be used from
// different threads at once.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/device.h"
#include "core/status.h"
#include "core/tensor.h"

namespace tandem::collectives {

enum class ReduceOp { kSum, kMax, kMin, kAvg };

// "sum", "max", "min", "avg".
const char* ReduceOpName(ReduceOp op);

struct CollectiveOptions {
  // Seconds every blocking call (and Synchronize) may take before it fails with
  // DeadlineExceeded and breaks the group. Must be > 0.
  double timeout_s = 60;
  // MPI (and NCCL bootstrapped over MPI): each rank sends one small message per collective to
  // group rank 0, so that a timeout can name the ranks that did not arrive. Off: a timeout
  // still names the ranks that fail a liveness check, but not which ones never arrived.
  bool track_arrivals = true;
  // NCCL only: run operations on this stream (the caller's, e.g. ops::Context::stream()), so no
  // cross-stream ordering is needed; nullptr: the communicator creates and owns a stream.
  CudaStream stream = nullptr;
};

// Color that puts a rank in no group: Split returns a null communicator on that rank.
inline constexpr int kNoColor = -1;

class Communicator {
 public:
  virtual ~Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // The name given at creation ("world") or by Split ("dp", "tp"); appears in every error.
  virtual std::string name() const = 0;
  // "mpi", "nccl" or "threads".
  virtual const char* backend() const = 0;
  // Where buffers must live: Device::Cpu() for MPI and threads, cuda:N for NCCL.
  virtual Device device() const = 0;
  // The rank of group rank `group_rank` in the group this one was split from, recursively: the
  // world rank (MPI_COMM_WORLD, or the thread group) the process/thread has.
  virtual int WorldRank(int group_rank) const = 0;

  // Element-wise reduction over ranks, result on every rank, in place.
  virtual Status AllReduce(Tensor& inout, ReduceOp op) = 0;
  // `in` holds size() equal chunks ([size() * n]); rank r receives the reduction of every rank's
  // chunk r in `out` ([n]). `out` must not overlap `in`.
  virtual Status ReduceScatter(Tensor& out, const Tensor& in, ReduceOp op) = 0;
  // Concatenates every rank's `in` ([n]) in rank order into `out` ([size() * n]). In place when
  // `in` is exactly chunk rank() of `out`; no other overlap allowed.
  virtual Status AllGather(Tensor& out, const Tensor& in) = 0;
  // Copies `inout` of rank `root` to every rank's `inout`.
  virtual Status Broadcast(Tensor& inout, int root) = 0;
  // Point to point. Send returns once the message is handed over (MPI/threads: matched by the
  // receiver, as MPI_Ssend; code that works on threads therefore does not deadlock on MPI).
  // Messages between two ranks with one tag arrive in order. NCCL ignores tags and matches in
  // issue order. Two ranks sending to each other must use SendRecv.
  virtual Status Send(const Tensor& t, int peer, int tag) = 0;
  virtual Status Recv(Tensor& t, int peer, int tag) = 0;
  // Sends `send` to `dst` and receives `recv` from `src` at once (a ring step: dst = rank + 1,
  // src = rank - 1). dst == src is allowed.
  virtual Status SendRecv(const Tensor& send, int dst, Tensor& recv, int src, int tag) = 0;
  // Returns once every rank has called Barrier (NCCL: and earlier operations are complete).
  virtual Status Barrier() = 0;
  // Ranks with the same color form a new group named `name`, ordered by (key, rank). Collective
  // over this group. color == kNoColor: this rank joins no group and gets nullptr.
  virtual StatusOr<std::unique_ptr<Communicator>> Split(int color, int key, std::string name) = 0;

  // Waits until every operation issued so far is complete (up to the timeout). OK at once on
  // host communicators, whose calls complete before returning.
  virtual Status Synchronize() = 0;
  // NCCL: the stream operations run on; nullptr for host communicators.
  virtual CudaStream stream() const { return nullptr; }

  // Breaks the group now: pending operations are abandoned (NCCL: ncclCommAbort), later calls
  // fail fast with Aborted(reason), and peers are told (MPI/NCCL over MPI: best-effort message;
  // threads: at once) so their pending and later calls fail with this reason instead of waiting
  // for their timeout. Idempotent.
  virtual Status Abort(std::string reason) = 0;
  // Clean shutdown: waits for pending work (up to the timeout) and releases the library handle
  // (NCCL: ncclCommFinalize + ncclCommDestroy; aborted instead on timeout). Later calls fail with
  // FailedPrecondition. Idempotent; after Abort it only releases.
  virtual Status Close() = 0;

 protected:
  Communicator() = default;
};

}  // namespace tandem::collectives
