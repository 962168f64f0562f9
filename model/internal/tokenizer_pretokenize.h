// Pre-tokenization for byte-level BPE, matching Hugging Face `tokenizers`: splitting text at
// added tokens, the GPT-2 and Llama-3 split patterns (hand-written matchers, since std::regex has
// neither Unicode classes nor the lookahead they use), Split behaviors and the ByteLevel step.
//
// Thread-safety: the types here are immutable after construction; all methods are const.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace tandem::model::internal {

// The split patterns this tokenizer knows, recognised by their exact pattern string.
enum class SplitRegex { kGpt2, kLlama3 };

// The GPT-2 pattern (also what ByteLevel with use_regex=true applies) and the Llama-3 pattern.
extern const std::string_view kGpt2Pattern;
extern const std::string_view kLlama3Pattern;

// Which known pattern `pattern` is, or nullopt.
std::optional<SplitRegex> RecognizeSplitRegex(std::string_view pattern);

// A byte range [begin, end) of a text, and whether the pattern matched it.
struct Span {
  size_t begin;
  size_t end;
  bool is_match;
};

// Cuts `text` into consecutive spans (matches of `re`, found leftmost-first as Oniguruma does,
// and the gaps between them) that together cover it. Empty text gives no spans.
std::vector<Span> FindRegexSpans(SplitRegex re, std::string_view text);
// The same for non-overlapping occurrences of a literal string (non-empty).
std::vector<Span> FindLiteralSpans(std::string_view literal, std::string_view text);

// How a Split step treats the matches (tokenizers' SplitDelimiterBehavior).
enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// One pre-tokenizer step: ByteLevel or Split.
struct PreTokenizerStep {
  enum class Kind { kByteLevel, kSplit };
  Kind kind = Kind::kByteLevel;
  // ByteLevel: prefix a space to each piece not starting with one; split with the GPT-2 pattern.
  bool add_prefix_space = false;
  bool use_regex = true;
  // Split: a known regex, or else the literal string.
  std::optional<SplitRegex> regex;
  std::string literal;
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
};

// Applies one step to every piece, replacing `pieces` with the non-empty results.
void ApplyPreTokenizerStep(const PreTokenizerStep& step, std::vector<std::string>* pieces);

// An added token as tokenizer.json describes it.
struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = false;
};

// A segment of the input: plain text (id < 0) or an added token's match.
struct Segment {
  std::string_view text;
  int32_t id;
};

// Finds added tokens in text as tokenizers does: first the tokens with normalized=false over the
// whole text, then those with normalized=true inside what is left (there is no normalizer), each
// pass leftmost-longest, honouring single_word, lstrip and rstrip.
class AddedTokenMatcher {
 public:
  explicit AddedTokenMatcher(const std::vector<AddedToken>& tokens);
  ~AddedTokenMatcher();
  AddedTokenMatcher(AddedTokenMatcher&&) noexcept;
  AddedTokenMatcher& operator=(AddedTokenMatcher&&) noexcept;

  // Segments covering `text` in order; plain segments are non-empty.
  std::vector<Segment> Split(std::string_view text) const;

 private:
  class Trie;
  std::unique_ptr<Trie> raw_;         // normalized == false
  std::unique_ptr<Trie> normalized_;  // normalized == true
};

}  // namespace tandem::model::internal
