// The whole run plot: layout of the title and the stacked panels (training loss with eval loss,
// throughput, and learning rate when logged), all sharing one step axis, rendered to a canvas.
//
// Thread-safety: stateless functions.
#pragma once

#include <string>
#include <vector>

#include "trainer/internal/plot_metrics.h"
#include "trainer/internal/plot_panel.h"
#include "trainer/internal/raster.h"

namespace tandem::trainer::internal {

inline constexpr Rgb kPlotBackground{255, 255, 255};
inline constexpr Rgb kLossRawColor{166, 199, 232};  // raw loss behind its smoothed curve
inline constexpr Rgb kLossColor{31, 119, 180};
inline constexpr Rgb kEvalLossColor{255, 127, 14};
inline constexpr Rgb kThroughputColor{44, 160, 44};
inline constexpr Rgb kLrColor{148, 103, 189};

struct RenderedPlot {
  Canvas canvas;
  std::vector<PanelFrame> frames;  // per panel, top to bottom: loss, tokens/s, [lr]
};

// Renders `metrics` (loss non-empty) into a width x height image titled with `run_name`.
// Precondition: width >= kMinPlotWidth, height >= kMinPlotHeight.
inline constexpr int kMinPlotWidth = 400;
inline constexpr int kMinPlotHeight = 300;
inline constexpr int kMaxPlotSide = 8192;
RenderedPlot RenderRunPlot(const RunMetrics& metrics, const std::string& run_name, int width,
                           int height);

// Zero-phase smoothing: a debiased exponential moving average with a time constant of about
// samples.size() / 50 points, run forward and then backward so the curve does not lag.
std::vector<Sample> SmoothLoss(const std::vector<Sample>& samples);

}  // namespace tandem::trainer::internal
