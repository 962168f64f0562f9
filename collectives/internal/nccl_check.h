// The NCCL check macro (NCCL builds only): turns an NCCL result into a Status naming the call
// site, the failing expression, NCCL's error name and the communicator's last error text.
// ncclInProgress is not an error (nonblocking communicators): the caller polls for completion.
#pragma once

#include <nccl.h>

#include "core/status.h"

#define TANDEM_NCCL_RETURN_IF_ERROR(expr, comm)                                      \
  do {                                                                               \
    const ncclResult_t tandem_nccl_res_ = (expr);                                    \
    if (tandem_nccl_res_ != ncclSuccess && tandem_nccl_res_ != ncclInProgress) {     \
      return ::tandem::InternalError(::tandem::StrCat(                               \
          ::tandem::internal::SourceLocation(__FILE__, __LINE__), ": ", #expr, ": ", \
          ncclGetErrorString(tandem_nccl_res_), " (", ncclGetLastError(comm), ")")); \
    }                                                                                \
  } while (0)
