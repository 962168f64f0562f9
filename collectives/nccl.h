// NCCL: communicators over device tensors, one GPU per rank.
//
//   TANDEM_ASSIGN_OR_RETURN(auto world, CreateMpiWorld(options));            // host bootstrap
//   TANDEM_ASSIGN_OR_RETURN(auto gpus, CreateNcclWorld(*world, mpi.local_rank(), options));
//   TANDEM_RETURN_IF_ERROR(gpus->AllReduce(grad, ReduceOp::kSum));   // enqueued on stream()
//   TANDEM_RETURN_IF_ERROR(gpus->Synchronize());                      // timed wait
//
// Rank 0 makes the NCCL unique id and broadcasts it over `bootstrap` (any host communicator:
// MPI, or a thread group with one GPU per thread); rank r of the NCCL group is rank r of
// `bootstrap`. The NCCL communicators are nonblocking (ncclConfig_t::blocking = 0): creation,
// Split and every enqueue are polled with ncclCommGetAsyncError, and completion with a CUDA event
// per operation, against a deadline of issue time + timeout_s; on a timeout or an asynchronous
// error the communicator is aborted (ncclCommAbort) and the group is broken. When `bootstrap` is
// an MPI communicator, a duplicate of it carries arrival reports (with track_arrivals), liveness
// checks and abort notices, so a timeout names the missing ranks and peers stop waiting.
//
// Operations are stream-ordered on stream() (CollectiveOptions::stream, or one the communicator
// owns): inputs must be ready on that stream, outputs are ready after Synchronize() or for work
// ordered after stream(). The communicator holds each operation's tensors until it completes, so
// the caching allocator cannot hand their memory out early. bf16/f16 reductions run in NCCL's
// kernels (f32 arithmetic, rounded to the dtype at each step). For a fixed rank count, topology,
// NCCL version and environment (NCCL_ALGO, NCCL_PROTO), results are run-to-run reproducible;
// they are not guaranteed across those. Tags of Send/Recv are ignored (issue order matches).
//
// CPU-only builds, and CUDA builds without NCCL: Unimplemented.
// Ownership: the communicator owns its ncclComm_t and stream; call Close() (or Abort()) before
// destroying it. Thread-safety: as collectives/communicator.h; the calling thread's current
// device is restored after each call.
#pragma once

#include <memory>

#include "collectives/communicator.h"

namespace tandem::collectives {

// True when this build has NCCL.
bool BuiltWithNccl();

// Collective over `bootstrap`. `device`: the CUDA device index this rank uses.
StatusOr<std::unique_ptr<Communicator>> CreateNcclWorld(Communicator& bootstrap, int device,
                                                        const CollectiveOptions& options);

}  // namespace tandem::collectives
