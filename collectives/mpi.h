// MPI: the process runtime (MpiRuntime) and communicators over host tensors (CreateMpiWorld).
//
//   int main(int argc, char** argv) {
//     auto mpi = MpiRuntime::Init(&argc, &argv);         // once per process, before anything MPI
//     if (!mpi.ok()) ...;
//     auto world = CreateMpiWorld({.timeout_s = 60});    // a private duplicate of MPI_COMM_WORLD
//     ... world->AllReduce(t, ReduceOp::kSum) ...
//     TANDEM_CHECK_OK(world->Close());
//     return mpi->Finalize().ok() ? 0 : 1;               // timed: never hangs on a dead peer
//   }
//
// Every operation is nonblocking underneath (MPI_Iallreduce, MPI_Ireduce_scatter_block,
// MPI_Iallgather, MPI_Ibcast, MPI_Ibarrier, MPI_Issend/Irecv) and polled with MPI_Test until it
// completes or the timeout passes. With CollectiveOptions::track_arrivals each rank reports its
// arrival at every collective to group rank 0 on a private duplicate communicator; on a timeout
// a rank asks rank 0 who arrived and pings every peer, so the error names the ranks that did
// not arrive and those that arrived but no longer answer (dead inside the operation). The
// first rank to give up tells the others (best effort), whose calls then fail at once. A broken
// group keeps its MPI communicators and the buffers of abandoned requests until exit, since MPI
// may still use them.
//
// Results: MPI chooses the reduction order (not guaranteed bitwise reproducible across rank
// counts or MPI versions; Open MPI is repeatable for a fixed size, layout and message size).
// bf16/f16 reductions are converted to f32, reduced in f32 and rounded once; u8 sums run in i32.
//
// Ownership: MpiRuntime owns MPI's initialization (move-only; Finalize is explicit; the
// destructor never finalizes, because finalizing can hang when a peer is gone). Communicators
// from CreateMpiWorld own their MPI_Comm and must not outlive Finalize in use (their destructors
// release the MPI_Comm only while MPI is still initialized).
// Thread-safety: MPI is initialized with MPI_THREAD_MULTIPLE when the library provides it
// (thread_multiple()); without it, use communicators from one thread only.
#pragma once

#include <memory>
#include <string>

#include "collectives/communicator.h"

namespace tandem::collectives {

class MpiRuntime {
 public:
  // MPI_Init_thread (asks for MPI_THREAD_MULTIPLE); also works without mpirun (one rank).
  // FailedPrecondition when MPI was already initialized in this process.
  static StatusOr<MpiRuntime> Init(int* argc, char*** argv, const CollectiveOptions& options = {});

  MpiRuntime(MpiRuntime&& other) noexcept;
  MpiRuntime& operator=(MpiRuntime&& other) noexcept;
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;
  ~MpiRuntime();  // warns when Finalize was not called; never calls MPI

  int world_rank() const { return world_rank_; }
  int world_size() const { return world_size_; }
  // Rank among the processes on this node and their number (use local_rank as the GPU index).
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  bool thread_multiple() const { return thread_multiple_; }
  // MPI's processor (host) name.
  const std::string& host_name() const { return host_name_; }

  // Waits for every rank with a timed barrier, then MPI_Finalize. When a rank does not arrive
  // within the timeout: DeadlineExceeded naming the missing ranks where known, and MPI is left
  // initialized (the caller exits non-zero; mpirun tears the job down). Idempotent.
  Status Finalize();
  // Ends every process of the job at once (MPI_Abort on MPI_COMM_WORLD), after logging `reason`
  // as an error. For failures the job cannot survive; mpirun exits with `exit_code`.
  [[noreturn]] void AbortJob(int exit_code, const std::string& reason);

 private:
  MpiRuntime() = default;
  bool active_ = false;  // this object initialized MPI and has not finalized it
  double timeout_s_ = 60;
  int world_rank_ = 0;
  int world_size_ = 1;
  int local_rank_ = 0;
  int local_size_ = 1;
  bool thread_multiple_ = false;
  std::string host_name_;
  std::unique_ptr<Communicator> finalize_group_;  // a world group for Finalize's timed barrier
};

// A communicator over every process (a private duplicate of MPI_COMM_WORLD) named "world".
// FailedPrecondition before MpiRuntime::Init.
StatusOr<std::unique_ptr<Communicator>> CreateMpiWorld(const CollectiveOptions& options);

}  // namespace tandem::collectives
