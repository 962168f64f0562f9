#include "trainer/internal/plot_axes.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "core/status.h"

namespace tandem::trainer::internal {

Ticks NiceTicks(AxisRange range, int target_count, double min_step) {
  TANDEM_CHECK_MSG(std::isfinite(range.lo) && std::isfinite(range.hi) && range.lo < range.hi,
                   "tick range must be finite and non-empty, found [", range.lo, ", ", range.hi,
                   "]");
  const double raw = (range.hi - range.lo) / std::max(target_count, 1);
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  const double norm = raw / magnitude;
  const double nice = norm < 1.5 ? 1 : norm < 3.5 ? 2 : norm < 7.5 ? 5 : 10;
  Ticks ticks;
  ticks.step = nice * magnitude;
  if (ticks.step < min_step) ticks.step = min_step;
  // Multiples are computed from integers, so labels do not collect rounding error.
  const double eps = 1e-9 * ticks.step;
  const auto first = static_cast<long long>(std::ceil((range.lo - eps) / ticks.step));
  const auto last = static_cast<long long>(std::floor((range.hi + eps) / ticks.step));
  for (long long k = first; k <= last; ++k)
    ticks.values.push_back(static_cast<double>(k) * ticks.step);
  return ticks;
}

std::string FormatTick(double value, double step, double max_abs) {
  if (std::fabs(value) < 1e-9 * step) return "0";
  char buf[48];
  if (max_abs > 0 && (max_abs < 1e-2 || max_abs >= 1e6)) {
    // Enough mantissa digits to tell ticks apart: the decades between the largest value and step.
    const int digits = static_cast<int>(std::floor(std::log10(max_abs) + 1e-9) -
                                        std::floor(std::log10(step) + 1e-9));
    std::snprintf(buf, sizeof(buf), "%.*e", std::clamp(digits, 0, 4), value);
  } else {
    const int decimals = static_cast<int>(-std::floor(std::log10(step) + 1e-9));
    std::snprintf(buf, sizeof(buf), "%.*f", std::clamp(decimals, 0, 8), value);
  }
  return buf;
}

AxisRange PaddedRange(const std::vector<double>& values, double pad_fraction) {
  double lo = INFINITY, hi = -INFINITY;
  for (double v : values) {
    if (!std::isfinite(v)) continue;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  TANDEM_CHECK_MSG(lo <= hi, "PaddedRange needs a finite value");
  if (hi - lo <= 1e-12 * std::max(std::fabs(lo), std::fabs(hi))) {
    const double half = lo != 0 ? std::fabs(lo) * 0.05 : 1.0;
    return {lo - half, hi + half};
  }
  const double pad = (hi - lo) * pad_fraction;
  return {lo - pad, hi + pad};
}

PointF Mapping::ToPixel(double data_x, double data_y) const {
  const double fx = (data_x - x.lo) / (x.hi - x.lo);
  const double fy = (data_y - y.lo) / (y.hi - y.lo);
  return {plot.x0 + fx * plot.width(), plot.y1 - fy * plot.height()};
}

std::vector<PointF> DecimateByColumn(const std::vector<PointF>& points) {
  std::vector<PointF> out;
  size_t i = 0;
  while (i < points.size()) {
    if (!std::isfinite(points[i].x)) {
      ++i;
      continue;
    }
    const double column = std::floor(points[i].x);
    size_t end = i, lowest = i, highest = i;  // lowest on screen = largest pixel y
    while (end < points.size() && std::floor(points[end].x) == column) {
      if (points[end].y > points[lowest].y) lowest = end;
      if (points[end].y < points[highest].y) highest = end;
      ++end;
    }
    size_t keep[4] = {i, std::min(lowest, highest), std::max(lowest, highest), end - 1};
    for (int k = 0; k < 4; ++k) {
      if (k == 0 || keep[k] != keep[k - 1]) out.push_back(points[keep[k]]);
    }
    i = end;
  }
  return out;
}

}  // namespace tandem::trainer::internal
