// Jinja lexing for serve/internal/jinja_parse.cc: template source -> pieces (text, {{ }}, {% %})
// with whitespace control applied, and one tag's text -> tokens.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"

namespace tandem::serve::internal {

// A run of template text or the inside of one {{ }} or {% %} tag, at offset `pos`.
struct Piece {
  enum class Kind { kText, kExpr, kStmt };
  Kind kind;
  std::string s;
  size_t pos;
};

// One token of a tag: a name (keywords included), a string or integer literal, an operator.
struct Tok {
  enum class Kind { kName, kString, kInt, kOp, kEnd };
  Kind kind;
  std::string s;
  int64_t i = 0;
  size_t pos = 0;
};

// "line L (offset P)" of `pos` in `src`, for error messages.
std::string Where(const std::string& src, size_t pos);

// Splits the template, applying `{%-`/`-%}`, trim_blocks and lstrip_blocks; comments dropped.
StatusOr<std::vector<Piece>> Scan(const std::string& src);

// Tokens of one tag's text `s`, which starts at offset `base` of `src`; ends with a kEnd token.
StatusOr<std::vector<Tok>> Tokenize(const std::string& s, size_t base, const std::string& src);

}  // namespace tandem::serve::internal
