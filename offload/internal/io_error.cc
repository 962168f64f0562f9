#include "offload/internal/io_error.h"

#include <cerrno>
#include <cstring>

namespace tandem::offload::internal {

Status ErrnoStatus(int err, const std::string& what) {
  const std::string message = StrCat(what, ": ", std::strerror(err), " (errno ", err, ")");
  switch (err) {
    case ENOSPC:
    case EDQUOT:
      return ResourceExhaustedError(message);
    case EIO:
      return DataLossError(message);
    case ENOENT:
      return NotFoundError(message);
    case EINVAL:
      return InvalidArgumentError(message);
    case EACCES:
    case EPERM:
    case EROFS:
      return FailedPreconditionError(message);
    default:
      return InternalError(message);
  }
}

}  // namespace tandem::offload::internal
