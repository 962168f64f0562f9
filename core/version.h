// What a binary was built from: recorded in run directories and benchmark lines.
#pragma once

namespace tandem {

// Short git commit of the source tree at build time, "-dirty" when tracked files differed,
// "unknown" outside a git checkout.
const char* GitCommit();
// "cuda" or "cpu", and the build type.
const char* BuildFlags();

}  // namespace tandem
