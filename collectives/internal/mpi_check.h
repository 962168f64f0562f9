// The MPI check macro: turns an MPI error code into a Status naming the call site and the
// failing expression. MPI objects made here use MPI_ERRORS_RETURN, so errors come back as codes.
#pragma once

#include <mpi.h>

#include <string>

#include "core/status.h"

namespace tandem::collectives::internal {
// "MPI_ERR_TRUNCATE: message truncated" (MPI's own text).
std::string MpiErrorString(int code);
// True while MPI is initialized and not finalized (MPI calls are legal).
bool MpiActive();
}  // namespace tandem::collectives::internal

#define TANDEM_MPI_RETURN_IF_ERROR(expr)                                             \
  do {                                                                               \
    const int tandem_mpi_err_ = (expr);                                              \
    if (tandem_mpi_err_ != MPI_SUCCESS) {                                            \
      return ::tandem::InternalError(::tandem::StrCat(                               \
          ::tandem::internal::SourceLocation(__FILE__, __LINE__), ": ", #expr, ": ", \
          ::tandem::collectives::internal::MpiErrorString(tandem_mpi_err_)));        \
    }                                                                                \
  } while (0)
