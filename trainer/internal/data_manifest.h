// manifest.json of a prepared data directory: the tokenizer, the splits and their shards, and the
// options that made it. Layout documented in docs/formats.md ("manifest.json").
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/status.h"
#include "trainer/data.h"

namespace tandem::trainer::internal {

inline constexpr char kManifestName[] = "manifest.json";
inline constexpr int kManifestVersion = 1;

struct ManifestShard {
  std::string file;  // relative to the data directory
  int64_t num_tokens = 0;
};

struct ManifestSplit {
  int64_t num_tokens = 0;
  int64_t num_docs = 0;
  int64_t num_loss_tokens = 0;
  std::vector<ManifestShard> shards;
};

struct ManifestInput {
  std::string path;
  std::string format;  // resolved
  int64_t num_docs = 0;
};

struct Manifest {
  std::string tokenizer_kind;
  int64_t vocab_size = 0;
  int64_t bos_id = -1;  // -1: not added
  int64_t eos_id = -1;
  std::string chat_template;  // "llama3" or "plain"
  int token_width = 2;
  std::map<std::string, ManifestSplit> splits;
  std::vector<ManifestInput> inputs;
  PrepareOptions options;
};

Status WriteManifest(const std::string& path, const Manifest& manifest);
// Errors name the file and the bad or missing key.
StatusOr<Manifest> ReadManifest(const std::string& path);

}  // namespace tandem::trainer::internal
