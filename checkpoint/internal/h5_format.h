// Names shared by the universal checkpoint's writer and reader (docs/formats.md lists them).
#pragma once

namespace tandem::checkpoint::internal {

inline constexpr char kFormatName[] = "tandem-universal";
inline constexpr char kParamsGroup[] = "params";
inline constexpr char kAdaptersGroup[] = "adapters";
// Datasets of one tensor's group, in this order everywhere (index `which`).
inline constexpr const char* kDatasetNames[3] = {"master", "exp_avg", "exp_avg_sq"};
inline constexpr char kLatestFile[] = "latest";

}  // namespace tandem::checkpoint::internal
