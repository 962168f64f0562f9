// `tandem plot RUN_DIR`: renders a training run's metrics.jsonl to a PNG a person can look at.
//
// The image stacks panels that share one step axis: training loss (the raw curve plus a smoothed
// one once there are 30 or more points, eval loss as an orange line with dots when logged, and a
// legend), throughput in tokens/s, and the learning rate when "lr" is logged. Axes have "nice"
// ticks (1, 2 or 5 times a power of ten) with numeric labels; the title names the run directory.
// The renderer (raster, bitmap font, PNG encoder) is built in, so plotting needs no Python.
//
// metrics.jsonl: one JSON object per line with an integer "step" and numeric "loss"; "eval_loss",
// "tokens_per_s", "lr" and "grad_norm" where logged (null means no value). Repeated steps (a
// resumed run) keep their last value; a partial last line of a run still writing is skipped.
//
//   TANDEM_RETURN_IF_ERROR(PlotRun("runs/llama-lora", "runs/llama-lora/plot.png"));
//
// Thread-safety: stateless; concurrent calls must write different output files.
#pragma once

#include <string>

#include "core/status.h"

namespace tandem::trainer {

struct PlotOptions {
  int width = 1200;  // pixels, 400..8192
  int height = 800;  // pixels, 300..8192
};

// Reads run_dir/metrics.jsonl and writes the plot to out_png (through a temporary file renamed
// into place). Errors: NotFound naming the path when metrics.jsonl is missing; InvalidArgument
// naming file:line for a malformed line, when no line has a finite "loss", or for options out of
// range; NotFound/Internal when out_png cannot be written.
Status PlotRun(const std::string& run_dir, const std::string& out_png,
               const PlotOptions& options = {});

// Where `tandem plot RUN_DIR` writes when no output is given: RUN_DIR/plot.png.
std::string DefaultPlotPath(const std::string& run_dir);

}  // namespace tandem::trainer
