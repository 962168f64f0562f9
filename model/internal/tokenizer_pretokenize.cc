#include "model/internal/tokenizer_pretokenize.h"

#include <algorithm>

#include "model/internal/tokenizer_unicode.h"

namespace tandem::model::internal {

const std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
const std::string_view kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3})"
    R"(| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

std::optional<SplitRegex> RecognizeSplitRegex(std::string_view pattern) {
  if (pattern == kGpt2Pattern) return SplitRegex::kGpt2;
  if (pattern == kLlama3Pattern) return SplitRegex::kLlama3;
  return std::nullopt;
}

namespace {

bool IsNewline(uint32_t cp) { return cp == '\r' || cp == '\n'; }

// End of the run of characters of class `cls` starting at `pos`.
size_t RunOf(std::string_view t, size_t pos, CharClass cls) {
  while (pos < t.size()) {
    DecodedChar c = DecodeUtf8(t, pos);
    if (c.cls != cls) break;
    pos += c.len;
  }
  return pos;
}

// 's 't 're 've 'm 'll 'd at `i` (t[i] == '\''); returns the end, or 0 when none matches.
// Case-insensitive matching folds ASCII capitals and U+017F (long s, whose case fold is 's').
size_t MatchContraction(std::string_view t, size_t i, bool ignore_case) {
  auto folded = [&](size_t pos, uint32_t* len) {
    DecodedChar c = DecodeUtf8(t, pos);
    *len = c.len;
    uint32_t cp = c.cp;
    if (ignore_case) {
      if (cp >= 'A' && cp <= 'Z') cp += 'a' - 'A';
      if (cp == 0x17F) cp = 's';
    }
    return cp;
  };
  uint32_t len1 = 0, len2 = 0;
  const uint32_t c1 = folded(i + 1, &len1);
  if (len1 == 0) return 0;
  if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return i + 1 + len1;
  const uint32_t c2 = folded(i + 1 + len1, &len2);
  if (len2 == 0) return 0;
  if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) {
    return i + 1 + len1 + len2;
  }
  return 0;
}

// `\s+(?!\S)|\s+` at a whitespace character: the whole run when it ends the text or is a single
// character; otherwise the run less its last character (which then leads the next piece).
size_t MatchSpaceRun(std::string_view t, size_t i) {
  size_t end = i, last = i;
  while (end < t.size()) {
    DecodedChar c = DecodeUtf8(t, end);
    if (c.cls != CharClass::kSpace) break;
    last = end;
    end += c.len;
  }
  if (end == t.size() || last == i) return end;
  return last;
}

// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
size_t MatchGpt2At(std::string_view t, size_t i) {
  const DecodedChar c = DecodeUtf8(t, i);
  if (c.cp == '\'') {
    if (size_t end = MatchContraction(t, i, /*ignore_case=*/false)) return end;
  }
  if (c.cp == ' ') {
    const DecodedChar next = DecodeUtf8(t, i + 1);
    if (next.len != 0 && next.cls != CharClass::kSpace) return RunOf(t, i + 1, next.cls);
  }
  if (c.cls != CharClass::kSpace) return RunOf(t, i, c.cls);
  return MatchSpaceRun(t, i);
}

// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
// \s*[\r\n]+|\s+(?!\S)|\s+
size_t MatchLlama3At(std::string_view t, size_t i) {
  const DecodedChar c = DecodeUtf8(t, i);
  if (c.cp == '\'') {
    if (size_t end = MatchContraction(t, i, /*ignore_case=*/true)) return end;
  }
  // [^\r\n\p{L}\p{N}]?\p{L}+
  if (c.cls != CharClass::kLetter && c.cls != CharClass::kNumber && !IsNewline(c.cp)) {
    const DecodedChar next = DecodeUtf8(t, i + c.len);
    if (next.len != 0 && next.cls == CharClass::kLetter) {
      return RunOf(t, i + c.len, CharClass::kLetter);
    }
  }
  if (c.cls == CharClass::kLetter) return RunOf(t, i, CharClass::kLetter);
  // \p{N}{1,3}
  if (c.cls == CharClass::kNumber) {
    size_t end = i;
    for (int n = 0; n < 3; ++n) {
      const DecodedChar d = DecodeUtf8(t, end);
      if (d.len == 0 || d.cls != CharClass::kNumber) break;
      end += d.len;
    }
    return end;
  }
  //  ?[^\s\p{L}\p{N}]+[\r\n]*
  size_t start = i;
  if (c.cp == ' ') {
    const DecodedChar next = DecodeUtf8(t, i + 1);
    if (next.len != 0 && next.cls == CharClass::kOther) start = i + 1;
  }
  if (start != i || c.cls == CharClass::kOther) {
    size_t end = RunOf(t, start, CharClass::kOther);
    while (end < t.size() && (t[end] == '\r' || t[end] == '\n')) ++end;
    return end;
  }
  // Here c is whitespace. \s*[\r\n]+ takes the run up to and including its last \r or \n.
  size_t end = i, last_newline = std::string_view::npos;
  while (end < t.size()) {
    const DecodedChar d = DecodeUtf8(t, end);
    if (d.cls != CharClass::kSpace) break;
    if (IsNewline(d.cp)) last_newline = end;
    end += d.len;
  }
  if (last_newline != std::string_view::npos) return last_newline + 1;
  return MatchSpaceRun(t, i);
}

// Keeps the spans of one split as tokenizers' NormalizedString::split does; empty ones dropped.
std::vector<std::pair<size_t, size_t>> ApplyBehavior(std::vector<Span> spans,
                                                     SplitBehavior behavior, bool invert) {
  if (invert) {
    for (Span& s : spans) s.is_match = !s.is_match;
  }
  std::vector<std::pair<size_t, size_t>> out;
  bool previous_match = false;
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (const Span& s : spans) out.emplace_back(s.begin, s.end);
      break;
    case SplitBehavior::kRemoved:
      for (const Span& s : spans) {
        if (!s.is_match) out.emplace_back(s.begin, s.end);
      }
      break;
    case SplitBehavior::kContiguous:
      for (const Span& s : spans) {
        if (s.is_match == previous_match && !out.empty()) {
          out.back().second = s.end;
        } else {
          out.emplace_back(s.begin, s.end);
        }
        previous_match = s.is_match;
      }
      break;
    case SplitBehavior::kMergedWithPrevious:
      for (const Span& s : spans) {
        if (s.is_match && !previous_match && !out.empty()) {
          out.back().second = s.end;
        } else {
          out.emplace_back(s.begin, s.end);
        }
        previous_match = s.is_match;
      }
      break;
    case SplitBehavior::kMergedWithNext:
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->is_match && !previous_match && !out.empty()) {
          out.back().first = it->begin;
        } else {
          out.emplace_back(it->begin, it->end);
        }
        previous_match = it->is_match;
      }
      std::reverse(out.begin(), out.end());
      break;
  }
  std::erase_if(out, [](const auto& r) { return r.first == r.second; });
  return out;
}

}  // namespace

std::vector<Span> FindRegexSpans(SplitRegex re, std::string_view text) {
  std::vector<Span> spans;
  size_t i = 0;
  while (i < text.size()) {
    // Every position starts a match of both patterns (their last alternatives take any
    // whitespace, and the others any letter, number or other character), so there are no gaps.
    const size_t end = re == SplitRegex::kGpt2 ? MatchGpt2At(text, i) : MatchLlama3At(text, i);
    spans.push_back({i, end, true});
    i = end;
  }
  return spans;
}

std::vector<Span> FindLiteralSpans(std::string_view literal, std::string_view text) {
  std::vector<Span> spans;
  size_t prev = 0;
  for (size_t pos = text.find(literal); pos != std::string_view::npos && !literal.empty();
       pos = text.find(literal, pos)) {
    if (pos > prev) spans.push_back({prev, pos, false});
    spans.push_back({pos, pos + literal.size(), true});
    pos += literal.size();
    prev = pos;
  }
  if (prev < text.size()) spans.push_back({prev, text.size(), false});
  return spans;
}

void ApplyPreTokenizerStep(const PreTokenizerStep& step, std::vector<std::string>* pieces) {
  std::vector<std::string> out;
  out.reserve(pieces->size());
  for (std::string& piece : *pieces) {
    if (step.kind == PreTokenizerStep::Kind::kByteLevel) {
      if (step.add_prefix_space && (piece.empty() || piece[0] != ' ')) piece.insert(0, 1, ' ');
      if (!step.use_regex) {
        std::string mapped;
        AppendByteLevel(piece, &mapped);
        out.push_back(std::move(mapped));
        continue;
      }
      for (const Span& s : FindRegexSpans(SplitRegex::kGpt2, piece)) {
        std::string mapped;
        AppendByteLevel(std::string_view(piece).substr(s.begin, s.end - s.begin), &mapped);
        out.push_back(std::move(mapped));
      }
      continue;
    }
    std::vector<Span> spans =
        step.regex ? FindRegexSpans(*step.regex, piece) : FindLiteralSpans(step.literal, piece);
    for (const auto& [b, e] : ApplyBehavior(std::move(spans), step.behavior, step.invert)) {
      out.push_back(piece.substr(b, e - b));
    }
  }
  std::erase_if(out, [](const std::string& s) { return s.empty(); });
  *pieces = std::move(out);
}

}  // namespace tandem::model::internal
