#include "core/version.h"

#include "tandem_version.h"  // generated at build time by cmake/version.cmake

namespace tandem {

const char* GitCommit() { return TANDEM_GIT_COMMIT_STRING; }

const char* BuildFlags() {
#ifdef TANDEM_WITH_CUDA
  return "cuda " TANDEM_BUILD_TYPE;
#else
  return "cpu " TANDEM_BUILD_TYPE;
#endif
}

}  // namespace tandem
