#include "trainer/internal/plot_figure.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "core/status.h"
#include "trainer/internal/raster_font.h"

namespace tandem::trainer::internal {
namespace {

constexpr Rgb kTitleInk{20, 20, 20};
constexpr Rgb kSubtitleInk{90, 90, 90};
constexpr size_t kSmoothMinSamples = 30;  // below this the raw loss is drawn alone

std::string Num(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), format, v);
  return buf;
}

const Sample& MinSample(const std::vector<Sample>& samples) {
  return *std::min_element(samples.begin(), samples.end(),
                           [](const Sample& a, const Sample& b) { return a.value < b.value; });
}

// Dots only where they stay apart: a few per 8 pixels at most.
double DotRadius(size_t count, int plot_width, double radius) {
  return count * 8 <= static_cast<size_t>(plot_width) ? radius : 0.0;
}

PanelSpec LossPanel(const RunMetrics& m, int s, int plot_width) {
  PanelSpec p;
  const Sample& best = MinSample(m.loss);
  p.title = StrCat("training loss: last ", Num("%.4g", m.loss.back().value), ", min ",
                   Num("%.4g", best.value), " at step ", best.step);
  if (!m.eval_loss.empty())
    p.title += StrCat("; eval loss last ", Num("%.4g", m.eval_loss.back().value));
  p.y_label = "loss";
  p.legend = true;
  const double line = std::max(1.5, 1.0 * s);
  if (m.loss.size() >= kSmoothMinSamples) {
    p.series.push_back({"train loss", m.loss, {kLossRawColor, std::max(1.0, 0.75 * s), 0}});
    p.series.push_back({"train loss (smoothed)", SmoothLoss(m.loss), {kLossColor, line, 0}});
  } else {
    p.series.push_back(
        {"train loss", m.loss, {kLossColor, line, DotRadius(m.loss.size(), plot_width, 1.5 * s)}});
  }
  if (!m.eval_loss.empty()) {
    const double dots = std::max(DotRadius(m.eval_loss.size(), plot_width, 2.5 * s),
                                 m.eval_loss.size() == 1 ? 2.5 * s : 0);
    p.series.push_back({"eval loss", m.eval_loss, {kEvalLossColor, line, dots}});
  }
  return p;
}

PanelSpec ThroughputPanel(const RunMetrics& m, int s, int plot_width) {
  PanelSpec p;
  p.y_label = "tokens/s";
  p.empty_message = "no tokens_per_s in metrics.jsonl";
  if (m.tokens_per_s.empty()) {
    p.title = "throughput (tokens/s): not logged";
    return p;
  }
  std::vector<double> values;
  for (const Sample& x : m.tokens_per_s) values.push_back(x.value);
  std::nth_element(values.begin(), values.begin() + values.size() / 2, values.end());
  p.title = StrCat("throughput (tokens/s): median ", Num("%.0f", values[values.size() / 2]),
                   ", last ", Num("%.0f", m.tokens_per_s.back().value));
  const double dots = DotRadius(m.tokens_per_s.size(), plot_width, 1.5 * s);
  p.series.push_back(
      {"tokens/s", m.tokens_per_s, {kThroughputColor, std::max(1.5, 1.0 * s), dots}});
  return p;
}

PanelSpec LrPanel(const RunMetrics& m, int s, int plot_width) {
  PanelSpec p;
  double peak = 0;
  for (const Sample& x : m.lr) peak = std::max(peak, x.value);
  p.title =
      StrCat("learning rate: last ", Num("%.3e", m.lr.back().value), ", peak ", Num("%.3e", peak));
  p.y_label = "lr";
  const double dots = DotRadius(m.lr.size(), plot_width, 1.5 * s);
  p.series.push_back({"lr", m.lr, {kLrColor, std::max(1.5, 1.0 * s), dots}});
  return p;
}

AxisRange StepRange(const std::vector<PanelSpec>& panels) {
  std::vector<double> steps;
  for (const PanelSpec& p : panels) {
    for (const PanelSeries& series : p.series) {
      for (const Sample& x : series.samples) steps.push_back(static_cast<double>(x.step));
    }
  }
  return PaddedRange(steps, 0.01);
}

// Vertical bands of each panel's data area: panel title above, tick labels below.
std::vector<RectI> PanelBands(int count, int height, int top, int bottom, int s) {
  const int th = TextHeight(s);
  const int panel_height = (height - top - bottom) / count;
  std::vector<RectI> bands;
  for (int i = 0; i < count; ++i) {
    const int y = top + i * panel_height;
    bands.push_back({0, y + th + 5 * s, 0, y + panel_height - (th + 9 * s)});
  }
  return bands;
}

// "tandem run: NAME" large at the top left, and the step span at the top right where it fits.
void DrawTitle(Canvas& canvas, const RunMetrics& m, const std::string& run_name, int s) {
  const std::string title = "tandem run: " + run_name;
  const std::string sub = StrCat("steps ", m.loss.front().step, "-", m.loss.back().step, ", ",
                                 m.num_records, " records");
  const int sub_width = TextWidth(sub, s);
  const bool with_sub = TextWidth(title, s + 1) + sub_width + 16 * s <= canvas.width();
  DrawText(canvas, 4 * s, 5 * s, FitText(title, canvas.width() - 8 * s, s + 1), kTitleInk, s + 1);
  if (with_sub) {
    // Baselines aligned: the larger font's ascent is kGlyphAscent rows taller.
    DrawText(canvas, canvas.width() - 4 * s - sub_width, 5 * s + kGlyphAscent, sub, kSubtitleInk,
             s);
  }
}

}  // namespace

std::vector<Sample> SmoothLoss(const std::vector<Sample>& samples) {
  const double tau = std::max(2.0, samples.size() / 50.0);
  const double keep = 1.0 - 1.0 / tau;
  // Debiased EMA over samples[i] for i in order; `reverse` runs it from the end.
  auto ema = [keep](std::vector<double>& v, bool reverse) {
    double mean = 0, weight = 0;
    for (size_t k = 0; k < v.size(); ++k) {
      double& x = v[reverse ? v.size() - 1 - k : k];
      mean = keep * mean + (1 - keep) * x;
      weight = keep * weight + (1 - keep);
      x = mean / weight;
    }
  };
  std::vector<double> values;
  values.reserve(samples.size());
  for (const Sample& x : samples) values.push_back(x.value);
  // Forward then backward: the two lags cancel, so the curve does not trail a falling loss.
  ema(values, false);
  ema(values, true);
  std::vector<Sample> out(samples);
  for (size_t i = 0; i < out.size(); ++i) out[i].value = values[i];
  return out;
}

RenderedPlot RenderRunPlot(const RunMetrics& m, const std::string& run_name, int width,
                           int height) {
  TANDEM_CHECK(!m.loss.empty());
  TANDEM_CHECK(width >= kMinPlotWidth && height >= kMinPlotHeight);
  const int s =
      std::clamp(static_cast<int>(std::lround(std::min(width / 600.0, height / 400.0))), 1, 4);
  const int th = TextHeight(s);
  const int title_band = 8 * s + TextHeight(s + 1);
  const int bottom_band = th + 4 * s;  // the "step" label
  const int count = m.lr.empty() ? 2 : 3;
  std::vector<RectI> bands = PanelBands(count, height, title_band, bottom_band, s);

  // Left margin from the widest y tick label of any panel, so all panels share one x mapping.
  const int rough_width = width - 60 * s;
  std::vector<PanelSpec> specs = {LossPanel(m, s, rough_width), ThroughputPanel(m, s, rough_width)};
  if (count == 3) specs.push_back(LrPanel(m, s, rough_width));
  std::vector<PanelFrame> frames(count);
  int label_width = 0;
  for (int i = 0; i < count; ++i) {
    frames[i].scale = s;
    const std::vector<double> values = PanelValues(specs[i]);
    frames[i].mapping.y = values.empty() ? AxisRange{0, 1} : PaddedRange(values, 0.05);
    if (!values.empty()) {
      frames[i].y_ticks =
          NiceTicks(frames[i].mapping.y, std::max(2, bands[i].height() / (th * 5 / 2)));
    }
    for (const std::string& label : TickLabels(frames[i].y_ticks))
      label_width = std::max(label_width, TextWidth(label, s));
  }
  const AxisRange steps = StepRange(specs);
  const int step_label_width = TextWidth(
      std::to_string(static_cast<long long>(std::max(std::fabs(steps.lo), std::fabs(steps.hi)))),
      s);
  const int left = 4 * s + th + 4 * s + label_width + 5 * s + 1;
  const int right = width - std::max(10 * s, step_label_width / 2 + 4 * s);
  const int x_target = std::clamp((right - left) / (step_label_width + 30 * s), 2, 12);
  const Ticks x_ticks = NiceTicks(steps, x_target, 1.0);
  for (int i = 0; i < count; ++i) {
    frames[i].mapping.x = steps;
    frames[i].mapping.plot = {left, bands[i].y0, right, bands[i].y1};
    frames[i].x_ticks = x_ticks;
    frames[i].y_label_x = 4 * s;
  }

  RenderedPlot out{Canvas(width, height, kPlotBackground), frames};
  DrawTitle(out.canvas, m, run_name, s);
  for (int i = 0; i < count; ++i) DrawPanel(out.canvas, specs[i], frames[i]);
  const RectI& last = frames.back().mapping.plot;
  DrawText(out.canvas, last.x0 + (last.width() - TextWidth("step", s)) / 2,
           height - bottom_band + s, "step", kTitleInk, s);
  return out;
}

}  // namespace tandem::trainer::internal
