// errno -> Status for the storage engine: one place decides which code an I/O failure gets.
#pragma once

#include <string>

#include "core/status.h"

namespace tandem::offload::internal {

// ENOSPC/EDQUOT -> ResourceExhausted, EIO -> DataLoss, ENOENT -> NotFound, EINVAL ->
// InvalidArgument, EACCES/EPERM/EROFS -> FailedPrecondition, others -> Internal. The message is
// "<what>: <strerror> (errno N)".
Status ErrnoStatus(int err, const std::string& what);

}  // namespace tandem::offload::internal
