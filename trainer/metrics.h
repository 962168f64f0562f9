// Per-step metrics: the metrics.jsonl writer, the progress line, and the MFU formula.
//
// MFU = tokens/s * FlopsPerToken / peak FLOP/s, with the formula of the HF baseline so numbers
// compare:  FlopsPerToken = 6 * N + 6 * L * C * T  (full training; 4 * N + ... with a frozen base)
// where N counts every parameter except the input embedding table (the lm_head counts, also when
// tied), L layers, C hidden size, T sequence length (causal attention's matmuls).
#pragma once

#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>

#include "core/status.h"
#include "model/config.h"

namespace tandem::trainer {

struct StepMetrics {
  int64_t step = 0;
  int64_t total_steps = 0;
  double loss = 0;
  double lr = 0;
  double grad_norm = 0;
  int64_t tokens = 0;         // input tokens processed this step (all micro-batches)
  double step_s = 0;          // wall time of this step
  double tokens_per_s = 0;    // over the last logging window
  double mfu = -1;            // fraction of peak; < 0 when the peak is unknown
  double mem_gib = 0;         // peak device memory (GPU) or resident set (CPU)
  double elapsed_s = 0;
  double eta_s = 0;
  std::optional<double> eval_loss;
  std::optional<double> eval_accuracy;  // train.eval_accuracy: argmax == target, target tokens
};

double FlopsPerToken(const model::LlamaConfig& config, int64_t seq_len, bool frozen_base);
// Dense bf16 peak of a device by its name (H100/H200: 989e12, A100: 312e12), or 0 when unknown.
double PeakFlopsForDevice(const std::string& device_name);

// Appends one JSON object per line; each line is flushed so a crash loses nothing written.
class MetricsWriter {
 public:
  static StatusOr<MetricsWriter> Open(const std::string& path);
  MetricsWriter(MetricsWriter&& o) noexcept : file_(o.file_), path_(std::move(o.path_)) { o.file_ = nullptr; }
  MetricsWriter& operator=(MetricsWriter&&) = delete;
  ~MetricsWriter();
  Status Write(const StepMetrics& m);

 private:
  MetricsWriter(std::FILE* f, std::string path) : file_(f), path_(std::move(path)) {}
  std::FILE* file_;
  std::string path_;
};

// "step 10/200 [====>    ] loss 3.2141 | lr 1.00e-03 | gnorm 1.23 | 12.3K tok/s | MFU 41.2% |
//  mem 1.20 GiB | ETA 1m23s"; the bar only when `bar` is true (a terminal).
std::string FormatProgressLine(const StepMetrics& m, bool bar);
std::string FormatDuration(double seconds);  // "1h02m", "3m07s", "12s"

}  // namespace tandem::trainer
