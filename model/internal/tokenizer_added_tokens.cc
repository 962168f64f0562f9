// AddedTokenMatcher: finds added tokens in raw text, as tokenizers' AddedVocabulary does.
#include <algorithm>
#include <bitset>
#include <unordered_map>

#include "model/internal/tokenizer_pretokenize.h"
#include "model/internal/tokenizer_unicode.h"

namespace tandem::model::internal {
namespace {

// Start of the character that ends just before byte `end` (end > 0).
size_t PrevCharStart(std::string_view t, size_t end) {
  size_t p = end - 1;
  while (p > 0 && end - p < 4 && (static_cast<uint8_t>(t[p]) & 0xC0) == 0x80) --p;
  if (DecodeUtf8(t, p).len != end - p) return end - 1;  // not one valid character: one byte
  return p;
}

// Word characters for single_word: letters, numbers and '_' (Rust's is_alphanumeric, with the
// pre-tokenizer's letter and number classes standing in for Unicode Alphabetic and Numeric).
bool IsWordChar(const DecodedChar& c) {
  return c.cls == CharClass::kLetter || c.cls == CharClass::kNumber || c.cp == '_';
}

}  // namespace

// A byte trie over one group of added tokens, giving the longest token starting at a position.
class AddedTokenMatcher::Trie {
 public:
  void Add(const AddedToken& token) {
    if (token.content.empty()) return;
    const int index = static_cast<int>(tokens_.size());
    tokens_.push_back(token);
    if (nodes_.empty()) nodes_.push_back(-1);
    uint32_t node = 0;
    for (char ch : token.content) {
      const auto b = static_cast<uint8_t>(ch);
      auto [it, inserted] = edges_.try_emplace(Key(node, b), static_cast<uint32_t>(nodes_.size()));
      if (inserted) nodes_.push_back(-1);
      node = it->second;
    }
    first_bytes_.set(static_cast<uint8_t>(token.content[0]));
    if (nodes_[node] < 0) nodes_[node] = index;  // a duplicate content keeps the first token
  }

  bool empty() const { return tokens_.empty(); }

  // Appends the segments of `text` (offsets relative to it) to `out`.
  void Split(std::string_view text, std::vector<Segment>* out) const;

 private:
  static uint64_t Key(uint32_t node, uint8_t b) { return (uint64_t{node} << 8) | b; }

  // The token with the longest content starting at `pos` (index into tokens_), or -1.
  int LongestAt(std::string_view t, size_t pos, size_t* len) const {
    int best = -1;
    uint32_t node = 0;
    for (size_t i = pos; i < t.size(); ++i) {
      auto it = edges_.find(Key(node, static_cast<uint8_t>(t[i])));
      if (it == edges_.end()) break;
      node = it->second;
      if (nodes_[node] >= 0) {
        best = nodes_[node];
        *len = i + 1 - pos;
      }
    }
    return best;
  }

  std::vector<AddedToken> tokens_;
  std::vector<int> nodes_;  // token index ending at each node, or -1
  std::unordered_map<uint64_t, uint32_t> edges_;
  std::bitset<256> first_bytes_;
};

void AddedTokenMatcher::Trie::Split(std::string_view text, std::vector<Segment>* out) const {
  size_t start_offset = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t len = 0;
    const int index =
        first_bytes_.test(static_cast<uint8_t>(text[pos])) ? LongestAt(text, pos, &len) : -1;
    if (index < 0) {
      ++pos;
      continue;
    }
    const AddedToken& token = tokens_[index];
    size_t start = pos, stop = pos + len;
    pos = stop;
    if (token.single_word) {
      const bool word_before =
          start > 0 && IsWordChar(DecodeUtf8(text, PrevCharStart(text, start)));
      const bool word_after = stop < text.size() && IsWordChar(DecodeUtf8(text, stop));
      if (word_before || word_after) continue;
    }
    if (token.lstrip) {
      size_t s = start;
      while (s > start_offset) {
        const size_t p = PrevCharStart(text, s);
        if (DecodeUtf8(text, p).cls != CharClass::kSpace) break;
        s = p;
      }
      start = std::max(s, start_offset);
    }
    if (token.rstrip) {
      while (stop < text.size()) {
        const DecodedChar c = DecodeUtf8(text, stop);
        if (c.cls != CharClass::kSpace) break;
        stop += c.len;
      }
      pos = stop;  // never match inside what was stripped
    }
    if (start > start_offset) out->push_back({text.substr(start_offset, start - start_offset), -1});
    out->push_back({text.substr(start, stop - start), token.id});
    start_offset = stop;
  }
  if (start_offset < text.size()) out->push_back({text.substr(start_offset), -1});
}

AddedTokenMatcher::AddedTokenMatcher(const std::vector<AddedToken>& tokens)
    : raw_(std::make_unique<Trie>()), normalized_(std::make_unique<Trie>()) {
  for (const AddedToken& t : tokens) (t.normalized ? normalized_ : raw_)->Add(t);
}
AddedTokenMatcher::~AddedTokenMatcher() = default;
AddedTokenMatcher::AddedTokenMatcher(AddedTokenMatcher&&) noexcept = default;
AddedTokenMatcher& AddedTokenMatcher::operator=(AddedTokenMatcher&&) noexcept = default;

std::vector<Segment> AddedTokenMatcher::Split(std::string_view text) const {
  std::vector<Segment> first;
  if (raw_->empty()) {
    if (!text.empty()) first.push_back({text, -1});
  } else {
    raw_->Split(text, &first);
  }
  if (normalized_->empty()) return first;
  std::vector<Segment> out;
  for (const Segment& s : first) {
    if (s.id >= 0) {
      out.push_back(s);
    } else {
      normalized_->Split(s.text, &out);
    }
  }
  return out;
}

}  // namespace tandem::model::internal
