// Orders the streams of two contexts on one device without waiting on the host: work that
// `waiter` queues after the call starts only once the work `signaler` queued before it is done.
// For side streams that take work off a context's critical path (peft::AdapterSet overlaps the
// LoRA weight gradients with the base model's backward this way).
//
//   TANDEM_RETURN_IF_ERROR(ops::WaitForStream(side, main));   // side sees main's results
//   ... queue work on side ...
//   TANDEM_RETURN_IF_ERROR(ops::WaitForStream(main, side));   // main sees side's results
//
// CPU contexts run their ops on the calling thread in call order: nothing to do. Contexts of
// different devices (or a CPU and a CUDA one): InvalidArgument.
#pragma once

#include "core/status.h"
#include "ops/context.h"

namespace tandem::ops {

Status WaitForStream(Context& waiter, Context& signaler);

}  // namespace tandem::ops
