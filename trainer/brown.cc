#include "trainer/brown.h"

#include <algorithm>
#include <cctype>
#include <map>
#include <nlohmann/json.hpp>
#include <vector>

#include "trainer/internal/data_io.h"
#include "trainer/internal/data_tar.h"

namespace tandem::trainer {
namespace {

// "package/c" + [a-r] + two digits.
bool IsSampleName(const std::string& name) {
  constexpr std::string_view kPrefix = "package/c";
  if (name.size() != kPrefix.size() + 3 || name.compare(0, kPrefix.size(), kPrefix) != 0) {
    return false;
  }
  const char* s = name.c_str() + kPrefix.size();
  return s[0] >= 'a' && s[0] <= 'r' && std::isdigit(static_cast<unsigned char>(s[1])) &&
         std::isdigit(static_cast<unsigned char>(s[2]));
}

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f'; }

// Whitespace-separated tokens of a line.
std::vector<std::string_view> Tokens(std::string_view line) {
  std::vector<std::string_view> out;
  size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && IsSpace(line[i])) ++i;
    const size_t start = i;
    while (i < line.size() && !IsSpace(line[i])) ++i;
    if (i > start) out.push_back(line.substr(start, i - start));
  }
  return out;
}

bool EndsWith(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// Inch marks inside a word ("10''") become a double quote.
std::string InchMarksToQuotes(std::string_view w) {
  std::string out;
  for (size_t i = 0; i < w.size(); ++i) {
    if (w[i] == '\'' && i + 1 < w.size() && w[i + 1] == '\'') {
      out.push_back('"');
      ++i;
    } else {
      out.push_back(w[i]);
    }
  }
  return out;
}

// Joins the words of one paragraph with the spacing rules of brown.h.
std::string Detokenize(const std::vector<std::string_view>& words) {
  std::string out;
  bool glue_next = true;  // no space before the next word
  bool single_open = false;
  std::string inch;
  for (std::string_view w : words) {
    std::string_view text = w;
    if (w != "''" && w.find("''") != std::string_view::npos) {
      inch = InchMarksToQuotes(w);
      text = inch;
    }
    if (w == "." && !out.empty() && out.back() == '.') continue;  // "Jr. ." ends a sentence
    bool attach_left = false;
    bool attach_right = false;
    if (w == "``") {
      text = "\"";
      attach_right = true;
    } else if (w == "''") {
      text = "\"";
      attach_left = true;
    } else if (w == "'") {
      attach_left = single_open;
      attach_right = !single_open;
      single_open = !single_open;
    } else if (w == "," || w == "." || w == ";" || w == ":" || w == "?" || w == "!" || w == ")" ||
               w == "]") {
      attach_left = true;
    } else if (w == "(" || w == "[") {
      attach_right = true;
    }
    if (!out.empty() && !glue_next && !attach_left) out += ' ';
    out += text;
    glue_next = attach_right;
  }
  return out;
}

}  // namespace

std::string BrownSampleToText(std::string_view tagged, BrownReport* report) {
  std::vector<std::vector<std::string_view>> paragraphs;
  bool after_blank = true;
  bool after_headline = false;
  size_t pos = 0;
  while (pos <= tagged.size()) {
    size_t end = tagged.find('\n', pos);
    if (end == std::string_view::npos) end = tagged.size();
    const std::string_view line = tagged.substr(pos, end - pos);
    pos = end + 1;
    const std::vector<std::string_view> tokens = Tokens(line);
    if (tokens.empty()) {
      after_blank = true;
      continue;
    }
    std::vector<std::string_view> words;
    bool headline = true;
    for (std::string_view tok : tokens) {
      const size_t slash = tok.rfind('/');
      const std::string_view tag = slash == std::string_view::npos ? "" : tok.substr(slash + 1);
      headline = headline && EndsWith(tag, "-hl");
      const std::string_view word = slash == std::string_view::npos ? tok : tok.substr(0, slash);
      if (!word.empty()) words.push_back(word);
    }
    if (report != nullptr) report->num_words += static_cast<int64_t>(tokens.size());
    const bool indented = line[0] == '\t' || line[0] == ' ';
    if (paragraphs.empty() || after_blank || indented || headline || after_headline) {
      paragraphs.emplace_back();
    }
    paragraphs.back().insert(paragraphs.back().end(), words.begin(), words.end());
    after_blank = false;
    after_headline = headline;
  }
  std::string text;
  for (const auto& p : paragraphs) {
    if (p.empty()) continue;
    if (!text.empty()) text += "\n\n";
    text += Detokenize(p);
    if (report != nullptr) report->num_paragraphs += 1;
  }
  return text;
}

StatusOr<BrownReport> ExtractBrownCorpus(const std::string& tgz_path, const std::string& out_path,
                                         const BrownOptions& options) {
  TANDEM_ASSIGN_OR_RETURN(internal::TarReader tar, internal::TarReader::Open(tgz_path));
  std::map<std::string, std::string> samples;  // name -> tagged text, in name order
  while (true) {
    TANDEM_ASSIGN_OR_RETURN(std::optional<internal::TarEntry> entry, tar.Next(IsSampleName));
    if (!entry) break;
    samples[entry->name] = std::move(entry->contents);
  }
  if (samples.empty()) {
    return DataLossError(
        StrCat("archive '", tgz_path, "' holds no Brown sample files (package/c[a-r][0-9][0-9])"));
  }
  BrownReport report;
  std::string jsonl;
  for (const auto& [name, tagged] : samples) {
    if (options.max_files >= 0 && report.num_documents >= options.max_files) break;
    nlohmann::json line = {{"id", name.substr(name.rfind('/') + 1)},
                           {"text", BrownSampleToText(tagged, &report)}};
    jsonl += line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    jsonl += '\n';
    report.num_documents += 1;
  }
  TANDEM_RETURN_IF_ERROR(internal::WriteFileAtomic(out_path, jsonl));
  report.num_bytes = static_cast<int64_t>(jsonl.size());
  return report;
}

}  // namespace tandem::trainer
