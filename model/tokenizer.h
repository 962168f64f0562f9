// Tokenizers: text <-> token ids.
//
// Two implementations behind one interface:
// - LoadTokenizer(path): byte-level BPE from a Hugging Face `tokenizer.json` (GPT-2 and Llama-3
//   style: a BPE model with merges, added and special tokens, a ByteLevel pre-tokenizer or a Split
//   pre-tokenizer with a regex followed by ByteLevel). Ids equal the `tokenizers` library's.
// - MakeByteTokenizer(): one id per byte (0..255) plus <bos>=256, <eos>=257, <pad>=258; for
//   models trained from scratch without a tokenizer file.
//
//   TANDEM_ASSIGN_OR_RETURN(auto tok, LoadTokenizer(dir + "/tokenizer.json"));
//   std::vector<int32_t> ids = tok->Encode("Hello world");
//   std::string text = tok->Decode(ids);
//
// Thread-safety: Encode/Decode are const and safe to call from several threads.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace tandem::model {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Ids of `text`, special-token strings in the text matched as special tokens. No BOS/EOS added.
  virtual std::vector<int32_t> Encode(std::string_view text) const = 0;
  // Text of `ids`; special tokens are kept as their strings unless skip_special.
  virtual std::string Decode(std::span<const int32_t> ids, bool skip_special = false) const = 0;
  // Number of ids (the largest id + 1), counting added tokens.
  virtual int64_t vocab_size() const = 0;
  virtual std::optional<int32_t> bos_id() const = 0;
  virtual std::optional<int32_t> eos_id() const = 0;
  // Id of a token string (e.g. "<|eot_id|>"), or NotFound.
  virtual StatusOr<int32_t> TokenId(std::string_view token) const = 0;
  // "byte" or "bpe".
  virtual std::string kind() const = 0;
};

// Parses a HF tokenizer.json (errors name the file and the JSON path that was wrong). BOS/EOS ids
// come from `tokenizer_config.json` beside it when present (bos_token/eos_token), else from common
// special-token names (<s>, </s>, <|begin_of_text|>, <|end_of_text|>, <|endoftext|>).
StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& tokenizer_json_path);
std::unique_ptr<Tokenizer> MakeByteTokenizer();

}  // namespace tandem::model
