// Helpers of the multi-rank tests that run the trainer end to end: a scratch directory shared by
// every rank, and a small JSONL corpus of random words.
#pragma once

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <random>
#include <string>

#include <nlohmann/json.hpp>

#include "collectives/communicator.h"
#include "core/tensor.h"
#include "tests/common/testing.h"

namespace tandem::testing {

// Rank 0's temporary directory, its path broadcast to every rank of `world`.
inline std::string SharedDir(collectives::Communicator& world, const TempDir& mine) {
  Tensor buf = Tensor::CpuZeros({512}, DType::kU8);
  if (world.rank() == 0) std::copy(mine.path().begin(), mine.path().end(), buf.data<uint8_t>());
  TANDEM_CHECK_OK(world.Broadcast(buf, 0));
  return std::string(reinterpret_cast<const char*>(buf.data<uint8_t>()));
}

// 200 documents of 30 words drawn from a 9-word list with std::mt19937(seed), one
// {"text": ...} object per line.
inline void WriteWordCorpus(const std::string& path, uint32_t seed) {
  const char* words[] = {"the", "jury", "said", "city", "of", "a", "report", "was", "new"};
  std::mt19937 gen(seed);
  std::ofstream out(path);
  for (int d = 0; d < 200; ++d) {
    std::string text;
    for (int w = 0; w < 30; ++w) text += std::string(w ? " " : "") + words[gen() % 9];
    out << nlohmann::json({{"text", text + "."}}).dump() << "\n";
  }
}

}  // namespace tandem::testing
