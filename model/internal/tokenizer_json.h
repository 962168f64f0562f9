// Reads a Hugging Face tokenizer.json into the parts of a byte-level BPE tokenizer, checking
// everything it relies on; errors name the file and the JSON path that was wrong.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/status.h"
#include "model/internal/tokenizer_bpe.h"
#include "model/internal/tokenizer_pretokenize.h"

namespace tandem::model::internal {

struct BpeTokenizerSpec {
  VocabMap vocab;                                   // model.vocab
  std::vector<std::pair<int32_t, int32_t>> merges;  // by rank: the ids merged
  std::vector<int32_t> merge_results;               // by rank: the id they merge into
  BpeOptions options;
  std::vector<AddedToken> added_tokens;
  std::vector<PreTokenizerStep> pre_tokenizer;  // flattened Sequence; holds a ByteLevel step
};

// `file` is used in error messages only.
StatusOr<BpeTokenizerSpec> ParseTokenizerJson(std::string_view json_text, const std::string& file);

// bos_token / eos_token of a tokenizer_config.json: nullopt when the key is absent, "" when it is
// null, else the token's string (given as a string or as an object with "content").
struct SpecialTokenNames {
  std::optional<std::string> bos;
  std::optional<std::string> eos;
};
StatusOr<SpecialTokenNames> ParseTokenizerConfigJson(std::string_view json_text,
                                                     const std::string& file);

}  // namespace tandem::model::internal
