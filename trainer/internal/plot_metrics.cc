#include "trainer/internal/plot_metrics.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <utility>

namespace tandem::trainer::internal {
namespace {

struct Field {
  const char* name;
  std::vector<Sample> RunMetrics::*series;
};

constexpr Field kFields[] = {
    {"loss", &RunMetrics::loss},
    {"eval_loss", &RunMetrics::eval_loss},
    {"tokens_per_s", &RunMetrics::tokens_per_s},
    {"lr", &RunMetrics::lr},
    {"grad_norm", &RunMetrics::grad_norm},
};

// The start of a line or value for an error message.
std::string Excerpt(const std::string& text) {
  constexpr size_t kMax = 60;
  return text.size() <= kMax ? text : text.substr(0, kMax) + "...";
}

StatusOr<int64_t> StepOf(const nlohmann::json& record, const std::string& where) {
  const auto it = record.find("step");
  if (it == record.end())
    return InvalidArgumentError(StrCat(where, ": expected an integer \"step\", found none"));
  if (it->is_number_integer()) return it->get<int64_t>();
  if (it->is_number_float()) {
    const double v = it->get<double>();
    if (std::isfinite(v) && v == std::floor(v) && std::fabs(v) < 9e15)
      return static_cast<int64_t>(v);
  }
  return InvalidArgumentError(
      StrCat(where, ": expected an integer \"step\", found ", Excerpt(it->dump())));
}

// Adds one line's values to `out`; the line's position breaks ties between repeated steps.
Status AddRecord(const nlohmann::json& record, const std::string& where, RunMetrics& out) {
  if (!record.is_object()) {
    return InvalidArgumentError(
        StrCat(where, ": expected a JSON object, found ", Excerpt(record.dump())));
  }
  TANDEM_ASSIGN_OR_RETURN(const int64_t step, StepOf(record, where));
  for (const Field& field : kFields) {
    const auto it = record.find(field.name);
    if (it == record.end() || it->is_null()) continue;
    if (!it->is_number()) {
      return InvalidArgumentError(StrCat(where, ": expected \"", field.name,
                                         "\" to be a number or null, found ", Excerpt(it->dump())));
    }
    const double v = it->get<double>();
    if (std::isfinite(v)) (out.*field.series).push_back({step, v});
  }
  ++out.num_records;
  return Status::Ok();
}

// Sorts by step and keeps the last sample of each step (stable sort keeps line order in a tie).
void SortAndDedupe(std::vector<Sample>& samples) {
  std::stable_sort(samples.begin(), samples.end(),
                   [](const Sample& a, const Sample& b) { return a.step < b.step; });
  std::vector<Sample> kept;
  kept.reserve(samples.size());
  for (size_t i = 0; i < samples.size(); ++i) {
    if (i + 1 < samples.size() && samples[i + 1].step == samples[i].step) continue;
    kept.push_back(samples[i]);
  }
  samples = std::move(kept);
}

bool IsBlank(const std::string& line) {
  return std::all_of(line.begin(), line.end(),
                     [](char c) { return std::isspace(static_cast<unsigned char>(c)); });
}

}  // namespace

StatusOr<RunMetrics> ParseRunMetrics(const std::string& text, const std::string& path) {
  RunMetrics out;
  size_t begin = 0;
  for (int64_t line_no = 1; begin < text.size(); ++line_no) {
    size_t end = text.find('\n', begin);
    const bool terminated = end != std::string::npos;
    if (!terminated) end = text.size();
    std::string line = text.substr(begin, end - begin);
    begin = end + 1;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (IsBlank(line)) continue;
    const std::string where = StrCat(path, ":", line_no);
    const nlohmann::json record = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (record.is_discarded()) {
      if (!terminated) break;  // the writer is in the middle of this line
      return InvalidArgumentError(
          StrCat(where, ": expected a JSON object, found malformed JSON: ", Excerpt(line)));
    }
    TANDEM_RETURN_IF_ERROR(AddRecord(record, where, out));
  }
  for (const Field& field : kFields) SortAndDedupe(out.*field.series);
  if (out.loss.empty()) {
    return InvalidArgumentError(StrCat(path, ": no usable points: none of its ", out.num_records,
                                       " records has a finite \"loss\""));
  }
  return out;
}

StatusOr<RunMetrics> ReadRunMetrics(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    return NotFoundError(StrCat("metrics file ", path, " not found"));
  }
  if (std::filesystem::is_directory(path, ec)) {
    return InvalidArgumentError(StrCat("metrics file ", path, " is a directory"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFoundError(StrCat("metrics file ", path, " exists but cannot be opened"));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return InternalError(StrCat("reading ", path, " failed"));
  return ParseRunMetrics(text.str(), path);
}

}  // namespace tandem::trainer::internal
