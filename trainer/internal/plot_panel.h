// One panel of a run plot: a framed data area with grid, ticks, numeric labels, a title, a rotated
// y-axis label, the series as anti-aliased lines (and dots), and an optional legend.
//
// Thread-safety: plain values and stateless functions.
#pragma once

#include <string>
#include <vector>

#include "trainer/internal/plot_axes.h"
#include "trainer/internal/plot_metrics.h"
#include "trainer/internal/raster.h"

namespace tandem::trainer::internal {

struct SeriesStyle {
  Rgb color;
  double line_px = 2;        // 0: no line
  double dot_radius_px = 0;  // 0: no dots
};

struct PanelSeries {
  std::string label;  // legend text
  std::vector<Sample> samples;
  SeriesStyle style;
};

struct PanelSpec {
  std::string title;
  std::string y_label;
  std::vector<PanelSeries> series;  // drawn in order, later on top
  bool legend = false;
  std::string empty_message;  // drawn instead when no series has a sample
};

// Where a panel goes and how its axes run; made by the figure layout.
struct PanelFrame {
  Mapping mapping;  // mapping.plot is the data area
  Ticks x_ticks;
  Ticks y_ticks;
  int scale = 1;      // font scale
  int y_label_x = 0;  // left edge of the rotated y-axis label
};

// All finite y values of the spec's series (for its range).
std::vector<double> PanelValues(const PanelSpec& spec);
// The tick label text of one axis, as FormatTick gives it for these ticks.
std::vector<std::string> TickLabels(const Ticks& ticks);

void DrawPanel(Canvas& canvas, const PanelSpec& spec, const PanelFrame& frame);

}  // namespace tandem::trainer::internal
