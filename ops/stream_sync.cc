// ops::WaitForStream: one event recorded on the signaler's stream and waited on by the waiter's.
#include "ops/stream_sync.h"

#ifdef TANDEM_WITH_CUDA
#include <cuda_runtime.h>

#include "ops/internal/cuda_resources.h"
#endif

namespace tandem::ops {

Status WaitForStream(Context& waiter, Context& signaler) {
  if (waiter.device() != signaler.device()) {
    return InvalidArgumentError(StrCat("WaitForStream: contexts on ", waiter.device().ToString(),
                                       " and ", signaler.device().ToString()));
  }
  if (&waiter == &signaler || !waiter.is_cuda()) return Status::Ok();
#ifdef TANDEM_WITH_CUDA
  cudaEvent_t event = nullptr;
  cudaError_t err = cudaEventCreateWithFlags(&event, cudaEventDisableTiming);
  if (err == cudaSuccess) err = cudaEventRecord(event, signaler.cuda()->stream);
  if (err == cudaSuccess) err = cudaStreamWaitEvent(waiter.cuda()->stream, event, 0);
  if (event != nullptr) cudaEventDestroy(event);  // released once the wait is satisfied
  if (err != cudaSuccess) {
    return InternalError(
        StrCat("WaitForStream on ", waiter.device().ToString(), ": ", cudaGetErrorString(err)));
  }
#endif
  return Status::Ok();
}

}  // namespace tandem::ops
