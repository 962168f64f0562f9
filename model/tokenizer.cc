#include "model/tokenizer.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <unordered_map>

#include "model/internal/tokenizer_bpe.h"
#include "model/internal/tokenizer_json.h"
#include "model/internal/tokenizer_pretokenize.h"
#include "model/internal/tokenizer_unicode.h"

namespace tandem::model {
namespace {

using internal::AddedToken;
using internal::AddedTokenMatcher;
using internal::BpeModel;
using internal::BpeTokenizerSpec;
using internal::PreTokenizerStep;

// ---------------------------------------------------------------------------------------------
// One id per byte, then <bos>, <eos>, <pad>.
class ByteTokenizer final : public Tokenizer {
 public:
  static constexpr int32_t kBos = 256, kEos = 257, kPad = 258;

  ByteTokenizer() : matcher_(SpecialTokens()) {}

  std::vector<int32_t> Encode(std::string_view text) const override {
    std::vector<int32_t> ids;
    ids.reserve(text.size());
    for (const internal::Segment& s : matcher_.Split(text)) {
      if (s.id >= 0) {
        ids.push_back(s.id);
        continue;
      }
      for (char c : s.text) ids.push_back(static_cast<uint8_t>(c));
    }
    return ids;
  }

  std::string Decode(std::span<const int32_t> ids, bool skip_special) const override {
    std::string out;
    out.reserve(ids.size());
    for (int32_t id : ids) {
      if (id >= 0 && id < 256) {
        out.push_back(static_cast<char>(id));
      } else if (id >= kBos && id <= kPad && !skip_special) {
        out += kNames[id - kBos];
      }  // ids out of range are skipped, as tokenizers does
    }
    return out;
  }

  int64_t vocab_size() const override { return 259; }
  std::optional<int32_t> bos_id() const override { return kBos; }
  std::optional<int32_t> eos_id() const override { return kEos; }
  StatusOr<int32_t> TokenId(std::string_view token) const override {
    for (int32_t i = 0; i < 3; ++i) {
      if (token == kNames[i]) return kBos + i;
    }
    if (token.size() == 1) return static_cast<int32_t>(static_cast<uint8_t>(token[0]));
    return NotFoundError(StrCat("byte tokenizer: no token \"", token,
                                "\" (tokens are single bytes and <bos>, <eos>, <pad>)"));
  }
  std::string kind() const override { return "byte"; }

 private:
  static constexpr const char* kNames[3] = {"<bos>", "<eos>", "<pad>"};
  static std::vector<AddedToken> SpecialTokens() {
    std::vector<AddedToken> tokens;
    for (int32_t i = 0; i < 3; ++i) {
      AddedToken t;
      t.id = kBos + i;
      t.content = kNames[i];
      t.special = true;
      tokens.push_back(t);
    }
    return tokens;
  }

  AddedTokenMatcher matcher_;
};

// ---------------------------------------------------------------------------------------------
// Byte-level BPE as configured by a tokenizer.json.
class BpeTokenizer final : public Tokenizer {
 public:
  explicit BpeTokenizer(BpeTokenizerSpec spec)
      : pre_tokenizer_(std::move(spec.pre_tokenizer)),
        matcher_(spec.added_tokens),
        model_(std::move(spec.vocab), spec.merges, spec.merge_results, spec.options) {
    int32_t max_id = -1;
    for (const auto& [token, id] : model_.vocab()) max_id = std::max(max_id, id);
    for (const AddedToken& t : spec.added_tokens) max_id = std::max(max_id, t.id);
    id_to_token_.resize(static_cast<size_t>(max_id) + 1);
    is_special_.assign(id_to_token_.size(), false);
    for (const auto& [token, id] : model_.vocab()) id_to_token_[id] = token;
    // Added tokens win over the model's token for the same id (tokenizers decodes them first).
    for (const AddedToken& t : spec.added_tokens) {
      id_to_token_[t.id] = t.content;
      is_special_[t.id] = t.special;
      added_ids_.emplace(t.content, t.id);
    }
  }

  std::vector<int32_t> Encode(std::string_view text) const override {
    std::vector<int32_t> ids;
    std::vector<std::string> pieces;
    for (const internal::Segment& s : matcher_.Split(text)) {
      if (s.id >= 0) {
        ids.push_back(s.id);
        continue;
      }
      pieces.assign(1, std::string(s.text));
      for (const PreTokenizerStep& step : pre_tokenizer_) {
        internal::ApplyPreTokenizerStep(step, &pieces);
      }
      for (const std::string& piece : pieces) model_.Tokenize(piece, &ids);
    }
    return ids;
  }

  // ByteLevel decoding: each token's characters map back to bytes; a token with a character
  // outside the byte alphabet (e.g. an added token with a space) is kept as its own text. The
  // bytes are returned as they are: ids that end inside a multi-byte character (a stream being
  // decoded) give incomplete UTF-8, where tokenizers would substitute U+FFFD.
  std::string Decode(std::span<const int32_t> ids, bool skip_special) const override {
    std::string out;
    for (int32_t id : ids) {
      if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size()) continue;
      if (skip_special && is_special_[id]) continue;
      const std::string& token = id_to_token_[id];
      const size_t mark = out.size();
      bool all_bytes = true;
      for (size_t i = 0; i < token.size();) {
        const internal::DecodedChar c = internal::DecodeUtf8(token, i);
        const int b = c.cp == internal::kInvalidCodePoint ? -1 : internal::CodePointToByte(c.cp);
        if (b < 0) {
          all_bytes = false;
          break;
        }
        out.push_back(static_cast<char>(b));
        i += c.len;
      }
      if (!all_bytes) {
        out.resize(mark);
        out += token;
      }
    }
    return out;
  }

  int64_t vocab_size() const override { return static_cast<int64_t>(id_to_token_.size()); }
  std::optional<int32_t> bos_id() const override { return bos_; }
  std::optional<int32_t> eos_id() const override { return eos_; }

  StatusOr<int32_t> TokenId(std::string_view token) const override {
    if (auto it = added_ids_.find(token); it != added_ids_.end()) return it->second;
    if (auto it = model_.vocab().find(token); it != model_.vocab().end()) return it->second;
    return NotFoundError(
        StrCat("tokenizer: no token \"", token, "\" in the vocabulary or the added tokens"));
  }

  std::string kind() const override { return "bpe"; }

  void set_bos(std::optional<int32_t> id) { bos_ = id; }
  void set_eos(std::optional<int32_t> id) { eos_ = id; }

 private:
  std::vector<PreTokenizerStep> pre_tokenizer_;
  AddedTokenMatcher matcher_;
  BpeModel model_;
  std::vector<std::string> id_to_token_;  // "" for ids nothing names
  std::vector<bool> is_special_;
  internal::VocabMap added_ids_;
  std::optional<int32_t> bos_, eos_;
};

StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFoundError(StrCat(path, ": cannot open for reading"));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return DataLossError(StrCat(path, ": read failed"));
  return ss.str();
}

// BOS/EOS from tokenizer_config.json beside the tokenizer, else from well-known token names.
Status ResolveBosEos(const std::string& tokenizer_json_path, BpeTokenizer* tok) {
  const std::filesystem::path config =
      std::filesystem::path(tokenizer_json_path).parent_path() / "tokenizer_config.json";
  internal::SpecialTokenNames names;
  if (std::filesystem::exists(config)) {
    TANDEM_ASSIGN_OR_RETURN(std::string text, ReadFile(config.string()));
    TANDEM_ASSIGN_OR_RETURN(names, internal::ParseTokenizerConfigJson(text, config.string()));
  }
  auto resolve =
      [&](const std::optional<std::string>& name, const char* key,
          std::initializer_list<const char*> fallbacks) -> StatusOr<std::optional<int32_t>> {
    if (name) {
      if (name->empty()) return std::optional<int32_t>();
      StatusOr<int32_t> id = tok->TokenId(*name);
      if (!id.ok()) {
        return InvalidArgumentError(StrCat(config.string(), ": ", key, ": token \"", *name,
                                           "\" is not in ", tokenizer_json_path));
      }
      return std::optional<int32_t>(*id);
    }
    for (const char* f : fallbacks) {
      if (StatusOr<int32_t> id = tok->TokenId(f); id.ok()) return std::optional<int32_t>(*id);
    }
    return std::optional<int32_t>();
  };
  TANDEM_ASSIGN_OR_RETURN(auto bos, resolve(names.bos, "bos_token", {"<s>", "<|begin_of_text|>"}));
  TANDEM_ASSIGN_OR_RETURN(
      auto eos, resolve(names.eos, "eos_token", {"</s>", "<|end_of_text|>", "<|endoftext|>"}));
  tok->set_bos(bos);
  tok->set_eos(eos);
  return Status::Ok();
}

}  // namespace

StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& tokenizer_json_path) {
  TANDEM_ASSIGN_OR_RETURN(std::string text, ReadFile(tokenizer_json_path));
  TANDEM_ASSIGN_OR_RETURN(BpeTokenizerSpec spec,
                          internal::ParseTokenizerJson(text, tokenizer_json_path));
  auto tok = std::make_unique<BpeTokenizer>(std::move(spec));
  TANDEM_RETURN_IF_ERROR(ResolveBosEos(tokenizer_json_path, tok.get()));
  return std::unique_ptr<Tokenizer>(std::move(tok));
}

std::unique_ptr<Tokenizer> MakeByteTokenizer() { return std::make_unique<ByteTokenizer>(); }

}  // namespace tandem::model
