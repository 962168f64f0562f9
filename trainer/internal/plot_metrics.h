// Reading a run's metrics.jsonl for `tandem plot`: the series the plot draws, each sorted by step.
//
// Each non-blank line must be a JSON object with an integer "step". The numeric fields "loss",
// "eval_loss", "tokens_per_s", "lr" and "grad_norm" are taken where present; null (how the writer
// stores NaN and infinities) means "no value on this line"; other fields are ignored. A step that
// appears more than once (a resumed run re-logs the steps after its checkpoint) keeps the value of
// its last line. A final line without a newline that does not parse is a write in progress and is
// skipped; any other malformed line is an error naming file:line.
//
// Thread-safety: stateless functions.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"

namespace tandem::trainer::internal {

struct Sample {
  int64_t step = 0;
  double value = 0;
};

struct RunMetrics {
  std::vector<Sample> loss;  // sorted by step, one sample per step
  std::vector<Sample> eval_loss;
  std::vector<Sample> tokens_per_s;
  std::vector<Sample> lr;
  std::vector<Sample> grad_norm;
  int64_t num_records = 0;  // JSON lines read
};

// Parses the contents of a metrics.jsonl; `path` only names the file in errors. InvalidArgument
// for a malformed line ("path:line: ...") or when no line has a finite "loss".
StatusOr<RunMetrics> ParseRunMetrics(const std::string& text, const std::string& path);
// Reads and parses `path`; NotFound naming the path when it does not exist.
StatusOr<RunMetrics> ReadRunMetrics(const std::string& path);

}  // namespace tandem::trainer::internal
