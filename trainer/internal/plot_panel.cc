#include "trainer/internal/plot_panel.h"

#include <algorithm>
#include <cmath>

#include "trainer/internal/raster_font.h"

namespace tandem::trainer::internal {
namespace {

constexpr Rgb kInk{34, 34, 34};
constexpr Rgb kFrameColor{90, 90, 90};
constexpr Rgb kGrid{228, 228, 228};
constexpr Rgb kLegendBorder{200, 200, 200};
constexpr Rgb kWhite{255, 255, 255};

int Floor(double v) { return static_cast<int>(std::floor(v)); }

void DrawGrid(Canvas& canvas, const PanelFrame& frame) {
  const Mapping& m = frame.mapping;
  const RectI& plot = m.plot;
  for (double y : frame.y_ticks.values) {
    const int py = std::clamp(Floor(m.ToPixel(m.x.lo, y).y), plot.y0, plot.y1 - 1);
    FillRect(canvas, {plot.x0, py, plot.x1, py + 1}, kGrid);
  }
  for (double x : frame.x_ticks.values) {
    const int px = std::clamp(Floor(m.ToPixel(x, m.y.lo).x), plot.x0, plot.x1 - 1);
    FillRect(canvas, {px, plot.y0, px + 1, plot.y1}, kGrid);
  }
}

void DrawSeries(Canvas& canvas, const PanelSeries& series, const Mapping& m) {
  std::vector<PointF> points;  // pixels
  points.reserve(series.samples.size());
  for (const Sample& s : series.samples)
    points.push_back(m.ToPixel(static_cast<double>(s.step), s.value));
  if (series.style.line_px > 0) {
    DrawPolyline(canvas, DecimateByColumn(points), series.style.color, series.style.line_px,
                 m.plot);
  }
  if (series.style.dot_radius_px > 0) {
    for (const PointF& p : points)
      DrawDot(canvas, p, series.style.dot_radius_px, series.style.color, m.plot);
  }
}

// Frame around the data area, tick marks outside it, and the numeric labels.
void DrawAxes(Canvas& canvas, const PanelFrame& frame) {
  const Mapping& m = frame.mapping;
  const RectI& plot = m.plot;
  const int s = frame.scale;
  const int tick_len = 3 * s;
  const int ascent = kGlyphAscent * s;
  StrokeRect(canvas, {plot.x0 - 1, plot.y0 - 1, plot.x1 + 1, plot.y1 + 1}, kFrameColor);
  const std::vector<std::string> y_labels = TickLabels(frame.y_ticks);
  for (size_t i = 0; i < frame.y_ticks.values.size(); ++i) {
    const int py =
        std::clamp(Floor(m.ToPixel(m.x.lo, frame.y_ticks.values[i]).y), plot.y0, plot.y1 - 1);
    FillRect(canvas, {plot.x0 - 1 - tick_len, py, plot.x0 - 1, py + 1}, kFrameColor);
    const int right = plot.x0 - 1 - tick_len - 2 * s;
    DrawText(canvas, right - TextWidth(y_labels[i], s), py - ascent / 2, y_labels[i], kInk, s);
  }
  const std::vector<std::string> x_labels = TickLabels(frame.x_ticks);
  for (size_t i = 0; i < frame.x_ticks.values.size(); ++i) {
    const int px =
        std::clamp(Floor(m.ToPixel(frame.x_ticks.values[i], m.y.lo).x), plot.x0, plot.x1 - 1);
    FillRect(canvas, {px, plot.y1 + 1, px + 1, plot.y1 + 1 + tick_len}, kFrameColor);
    const int width = TextWidth(x_labels[i], s);
    const int left = std::clamp(px - width / 2, 0, std::max(0, canvas.width() - width));
    DrawText(canvas, left, plot.y1 + 1 + tick_len + 2 * s, x_labels[i], kInk, s);
  }
}

// A boxed list of the labelled series with a line (and dot) swatch each, top-right in the plot.
void DrawLegend(Canvas& canvas, const PanelSpec& spec, const PanelFrame& frame) {
  std::vector<const PanelSeries*> entries;
  for (const PanelSeries& series : spec.series) {
    if (!series.label.empty() && !series.samples.empty()) entries.push_back(&series);
  }
  if (entries.empty()) return;
  const int s = frame.scale;
  const int pad = 4 * s, swatch = 12 * s, row = TextHeight(s) + 2 * s;
  int text_width = 0;
  for (const PanelSeries* e : entries) text_width = std::max(text_width, TextWidth(e->label, s));
  const RectI& plot = frame.mapping.plot;
  const int width = 2 * pad + swatch + 3 * s + text_width;
  const int height = 2 * pad + row * static_cast<int>(entries.size()) - 2 * s;
  const RectI box{plot.x1 - 6 * s - width, plot.y0 + 6 * s, plot.x1 - 6 * s,
                  plot.y0 + 6 * s + height};
  FillRect(canvas, box, kWhite);
  StrokeRect(canvas, box, kLegendBorder);
  for (size_t i = 0; i < entries.size(); ++i) {
    const int top = box.y0 + pad + row * static_cast<int>(i);
    const double mid = top + kGlyphAscent * s / 2.0;
    const SeriesStyle& style = entries[i]->style;
    const PointF a{box.x0 + pad + 0.5, mid}, b{box.x0 + pad + swatch - 0.5, mid};
    if (style.line_px > 0)
      DrawPolyline(canvas, {a, b}, style.color, std::max(style.line_px, 2.0), box);
    if (style.dot_radius_px > 0)
      DrawDot(canvas, {(a.x + b.x) / 2, mid}, style.dot_radius_px, style.color, box);
    DrawText(canvas, box.x0 + pad + swatch + 3 * s, top, entries[i]->label, kInk, s);
  }
}

}  // namespace

std::vector<double> PanelValues(const PanelSpec& spec) {
  std::vector<double> values;
  for (const PanelSeries& series : spec.series) {
    for (const Sample& sample : series.samples) values.push_back(sample.value);
  }
  return values;
}

std::vector<std::string> TickLabels(const Ticks& ticks) {
  double max_abs = 0;
  for (double v : ticks.values) max_abs = std::max(max_abs, std::fabs(v));
  std::vector<std::string> labels;
  for (double v : ticks.values) labels.push_back(FormatTick(v, ticks.step, max_abs));
  return labels;
}

void DrawPanel(Canvas& canvas, const PanelSpec& spec, const PanelFrame& frame) {
  const RectI& plot = frame.mapping.plot;
  const int s = frame.scale;
  FillRect(canvas, plot, kWhite);
  const bool has_data = !PanelValues(spec).empty();
  if (has_data) {
    DrawGrid(canvas, frame);
    for (const PanelSeries& series : spec.series) DrawSeries(canvas, series, frame.mapping);
  } else {
    const int width = TextWidth(spec.empty_message, s);
    DrawText(canvas, plot.x0 + (plot.width() - width) / 2,
             plot.y0 + (plot.height() - TextHeight(s)) / 2, spec.empty_message, kFrameColor, s);
  }
  DrawAxes(canvas, frame);
  const std::string title = FitText(spec.title, canvas.width() - plot.x0 - 2 * s, s);
  DrawText(canvas, plot.x0, plot.y0 - 1 - 3 * s - TextHeight(s), title, kInk, s);
  const int label_length = TextWidth(spec.y_label, s);
  DrawTextUp(canvas, frame.y_label_x, plot.y0 + (plot.height() - label_length) / 2, spec.y_label,
             kInk, s);
  if (spec.legend && has_data) DrawLegend(canvas, spec, frame);
}

}  // namespace tandem::trainer::internal
