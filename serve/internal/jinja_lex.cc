// Jinja lexing: pieces and tokens.
#include "serve/internal/jinja_lex.h"

#include <cctype>
#include <string>
#include <utility>
#include <vector>

namespace tandem::serve::internal {
namespace {

size_t FindTagStart(const std::string& src, size_t from) {
  for (size_t i = src.find('{', from); i != std::string::npos; i = src.find('{', i + 1)) {
    if (i + 1 < src.size() && (src[i + 1] == '{' || src[i + 1] == '%' || src[i + 1] == '#')) {
      return i;
    }
  }
  return std::string::npos;
}

// The offset of `close` after `from`, skipping quoted strings; npos if absent.
size_t FindTagEnd(const std::string& src, size_t from, const char* close, bool strings) {
  char quote = 0;
  for (size_t i = from; i + 1 < src.size(); ++i) {
    if (quote) {
      if (src[i] == '\\')
        ++i;
      else if (src[i] == quote)
        quote = 0;
    } else if (strings && (src[i] == '\'' || src[i] == '"')) {
      quote = src[i];
    } else if (src[i] == close[0] && src[i + 1] == close[1]) {
      return i;
    }
  }
  return std::string::npos;
}

bool ReadString(const std::string& s, size_t* i, std::string* out) {
  const char quote = s[(*i)++];
  while (*i < s.size() && s[*i] != quote) {
    char c = s[(*i)++];
    if (c == '\\' && *i < s.size()) {
      const char e = s[(*i)++];
      c = e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
    }
    out->push_back(c);
  }
  if (*i >= s.size()) return false;
  ++*i;
  return true;
}

}  // namespace

std::string Where(const std::string& src, size_t pos) {
  size_t line = 1;
  for (size_t i = 0; i < pos && i < src.size(); ++i) line += src[i] == '\n';
  return StrCat("line ", line, " (offset ", pos, ")");
}

// Applies `{%-`/`-%}`, trim_blocks (drop the newline after a block tag) and lstrip_blocks (drop
// the indentation before a block tag that starts its line), as HF's renderer configures Jinja.
StatusOr<std::vector<Piece>> Scan(const std::string& src) {
  std::vector<Piece> out;
  size_t pos = 0;
  bool strip_next = false, trim_newline = false;
  while (true) {
    const size_t start = FindTagStart(src, pos);
    std::string text = src.substr(pos, (start == std::string::npos ? src.size() : start) - pos);
    if (strip_next) {
      const size_t first = text.find_first_not_of(" \t\r\n");
      text.erase(0, first == std::string::npos ? text.size() : first);
    } else if (trim_newline && text.rfind("\n", 0) == 0) {
      text.erase(0, 1);
    } else if (trim_newline && text.rfind("\r\n", 0) == 0) {
      text.erase(0, 2);
    }
    if (start == std::string::npos) {
      if (!text.empty()) out.push_back({Piece::Kind::kText, text, pos});
      return out;
    }
    const char kind = src[start + 1];
    size_t inner = start + 2;
    const char mark = inner < src.size() ? src[inner] : 0;
    if (mark == '-') {
      const size_t last = text.find_last_not_of(" \t\r\n");
      text.erase(last == std::string::npos ? 0 : last + 1);
    } else if (kind != '{' && mark != '+') {
      size_t j = start;
      while (j > pos && (src[j - 1] == ' ' || src[j - 1] == '\t')) --j;
      if ((j == 0 || src[j - 1] == '\n') && start - j <= text.size()) {
        text.erase(text.size() - (start - j));
      }
    }
    if (mark == '-' || mark == '+') ++inner;
    const char* close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
    const size_t end = FindTagEnd(src, inner, close, kind != '#');
    if (end == std::string::npos) {
      return InvalidArgumentError(StrCat("unclosed '{", kind, "' at ", Where(src, start)));
    }
    const bool strip_after = end > inner && src[end - 1] == '-';
    if (!text.empty()) out.push_back({Piece::Kind::kText, text, pos});
    if (kind != '#') {
      out.push_back({kind == '{' ? Piece::Kind::kExpr : Piece::Kind::kStmt,
                     src.substr(inner, end - (strip_after ? 1 : 0) - inner), inner});
    }
    pos = end + 2;
    strip_next = strip_after;
    trim_newline = !strip_after && kind != '{';
  }
}

StatusOr<std::vector<Tok>> Tokenize(const std::string& s, size_t base, const std::string& src) {
  static const char* kTwo[] = {"==", "!=", "<=", ">=", "//", "**"};
  std::vector<Tok> out;
  size_t i = 0;
  while (i < s.size()) {
    const char c = s[i];
    const size_t at = base + i;
    if (std::isspace(static_cast<unsigned char>(c))) {
      ++i;
    } else if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t j = i;
      while (j < s.size() && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == '_')) ++j;
      out.push_back({Tok::Kind::kName, s.substr(i, j - i), 0, at});
      i = j;
    } else if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t j = i;
      while (j < s.size() && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
      out.push_back({Tok::Kind::kInt, "", std::stoll(s.substr(i, j - i)), at});
      i = j;
    } else if (c == '\'' || c == '"') {
      Tok t{Tok::Kind::kString, "", 0, at};
      if (!ReadString(s, &i, &t.s)) {
        return InvalidArgumentError(StrCat("unterminated string at ", Where(src, at)));
      }
      out.push_back(std::move(t));
    } else {
      std::string op(1, c);
      for (const char* two : kTwo) {
        if (s.compare(i, 2, two) == 0) op = two;
      }
      if (std::string("()[]{}.,:|+-*/%~<>=!").find(c) == std::string::npos) {
        return InvalidArgumentError(StrCat("unexpected character '", c, "' at ", Where(src, at)));
      }
      out.push_back({Tok::Kind::kOp, op, 0, at});
      i += op.size();
    }
  }
  out.push_back({Tok::Kind::kEnd, "", 0, base + s.size()});
  return out;
}

}  // namespace tandem::serve::internal
