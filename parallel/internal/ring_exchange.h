// RingExchange: one SendRecv around a ring (send to rank + 1, receive from rank - 1) ordered
// against the compute stream of an ops::Context. Private to parallel/ring_attention.cc.
//
// Host communicators (and NCCL on ctx.stream() itself) need no ordering: Start does the whole
// exchange (host) or enqueues it in stream order (NCCL on the same stream) and Finish does
// nothing. NCCL on its own stream: Start records an event on ctx.stream() that the communicator's
// stream waits for (the send buffer is written and earlier readers of the receive buffer are
// done), enqueues the SendRecv, and records a second event on the communicator's stream; Finish
// makes ctx.stream() wait for it, so work enqueued after Finish sees the received data while work
// enqueued between Start and Finish overlaps the transfer.
//
// Thread-safety: one thread at a time, like the context and communicator it uses.
#pragma once

#include <optional>

#include "collectives/communicator.h"
#include "core/status.h"
#include "core/stream.h"
#include "core/tensor.h"
#include "ops/context.h"

namespace tandem::parallel::internal {

class RingExchange {
 public:
  // Checks that the communicator's buffers live on ctx's device and creates the events it needs.
  static StatusOr<RingExchange> Create(ops::Context& ctx, collectives::Communicator& comm);

  // Starts sending `send` to rank + 1 and receiving `recv` from rank - 1 (same shape and dtype,
  // contiguous, distinct buffers). `tag` separates the streams of messages of one call.
  Status Start(const Tensor& send, Tensor& recv, int tag);
  // Orders later work on ctx.stream() after the receive of the last Start.
  Status Finish();

 private:
  RingExchange(ops::Context& ctx, collectives::Communicator& comm) : ctx_(&ctx), comm_(&comm) {}
  ops::Context* ctx_;
  collectives::Communicator* comm_;
  // Set only for NCCL on a stream other than ctx.stream().
  std::optional<CudaEventOwner> ready_;
  std::optional<CudaEventOwner> done_;
};

}  // namespace tandem::parallel::internal
