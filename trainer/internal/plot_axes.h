// Axis arithmetic for the plot renderer: "nice" tick positions (1, 2 or 5 times a power of ten),
// tick labels, padded data ranges, the data-to-pixel mapping and min/max decimation of long
// series.
//
// Thread-safety: stateless functions and plain values.
#pragma once

#include <string>
#include <vector>

#include "trainer/internal/raster.h"

namespace tandem::trainer::internal {

struct AxisRange {
  double lo = 0;
  double hi = 1;
};

struct Ticks {
  double step = 1;             // 1, 2 or 5 times a power of ten
  std::vector<double> values;  // every multiple of step inside the range, ascending
};

// Ticks inside [range.lo, range.hi] with a step chosen so that about `target_count` of them fit
// (never fewer than 2 when the range spans two multiples of the step). The step is at least
// `min_step` (1 for integer axes such as steps). Precondition: lo < hi, both finite.
Ticks NiceTicks(AxisRange range, int target_count, double min_step = 0);

// A tick label: "0" for zero; fixed notation with as many decimals as `step` needs ("0.5",
// "12000"), or scientific ("1.2e-03") when the axis's largest magnitude `max_abs` is below 1e-2 or
// at least 1e6.
std::string FormatTick(double value, double step, double max_abs);

// [min, max] of `values` (finite ones) widened by `pad_fraction` of the span on each side; a
// zero-width range is widened around its value. Precondition: some value is finite.
AxisRange PaddedRange(const std::vector<double>& values, double pad_fraction);

// Maps data coordinates into the pixel rectangle `plot` (y grows downwards on screen).
struct Mapping {
  AxisRange x;
  AxisRange y;
  RectI plot;
  PointF ToPixel(double data_x, double data_y) const;
};

// Keeps, for each pixel column (points with the same floor(x)), the first, lowest, highest and last
// point (in order), so a long series draws the same envelope with at most 4 points a column. Points
// must be sorted by x (pixels).
std::vector<PointF> DecimateByColumn(const std::vector<PointF>& points);

}  // namespace tandem::trainer::internal
