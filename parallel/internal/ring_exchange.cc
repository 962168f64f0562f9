#include "parallel/internal/ring_exchange.h"

#include <utility>

namespace tandem::parallel::internal {

StatusOr<RingExchange> RingExchange::Create(ops::Context& ctx, collectives::Communicator& comm) {
  if (comm.device() != ctx.device()) {
    return InvalidArgumentError(StrCat(
        "ring attention: communicator '", comm.name(), "' (", comm.backend(), ") moves buffers on ",
        comm.device().ToString(), ", but the tensors are on ", ctx.device().ToString()));
  }
  RingExchange x(ctx, comm);
  if (ctx.is_cuda() && comm.stream() != nullptr && comm.stream() != ctx.stream()) {
    TANDEM_ASSIGN_OR_RETURN(CudaEventOwner ready,
                            CudaEventOwner::Create(ctx.device().index, /*timing=*/false));
    TANDEM_ASSIGN_OR_RETURN(CudaEventOwner done,
                            CudaEventOwner::Create(ctx.device().index, /*timing=*/false));
    x.ready_.emplace(std::move(ready));
    x.done_.emplace(std::move(done));
  }
  return x;
}

Status RingExchange::Start(const Tensor& send, Tensor& recv, int tag) {
  const int n = comm_->size();
  const int next = (comm_->rank() + 1) % n;
  const int prev = (comm_->rank() + n - 1) % n;
  if (ready_) {
    TANDEM_RETURN_IF_ERROR(ready_->Record(ctx_->stream()));
    TANDEM_RETURN_IF_ERROR(ready_->Wait(comm_->stream()));
  }
  TANDEM_RETURN_IF_ERROR(comm_->SendRecv(send, next, recv, prev, tag));
  if (done_) TANDEM_RETURN_IF_ERROR(done_->Record(comm_->stream()));
  return Status::Ok();
}

Status RingExchange::Finish() {
  if (done_) TANDEM_RETURN_IF_ERROR(done_->Wait(ctx_->stream()));
  return Status::Ok();
}

}  // namespace tandem::parallel::internal
