// A tiny RGB raster for the plot renderer: a canvas, filled rectangles, anti-aliased polylines
// and dots, and text in the built-in bitmap font (raster_font.h).
//
// Coordinates are pixels with (0, 0) at the top-left corner; pixel (x, y) covers the square
// [x, x + 1) x [y, y + 1), so its centre is (x + 0.5, y + 0.5). Everything drawn is clipped to the
// canvas (and, for polylines and dots, to an optional clip rectangle).
//
// Thread-safety: a Canvas is a plain value; concurrent drawing on one canvas needs outside locking.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tandem::trainer::internal {

struct Rgb {
  uint8_t r = 0;
  uint8_t g = 0;
  uint8_t b = 0;
  bool operator==(const Rgb&) const = default;
};

struct PointF {
  double x = 0;
  double y = 0;
};

// Half-open integer rectangle [x0, x1) x [y0, y1).
struct RectI {
  int x0 = 0;
  int y0 = 0;
  int x1 = 0;
  int y1 = 0;
  int width() const { return x1 - x0; }
  int height() const { return y1 - y0; }
  bool Contains(int x, int y) const { return x >= x0 && x < x1 && y >= y0 && y < y1; }
};

class Canvas {
 public:
  // Precondition: width > 0 and height > 0.
  Canvas(int width, int height, Rgb background);

  int width() const { return width_; }
  int height() const { return height_; }
  RectI bounds() const { return {0, 0, width_, height_}; }
  Rgb At(int x, int y) const;
  // Writes `color` over (x, y) with opacity alpha in [0, 1]; no-op outside the canvas.
  void Blend(int x, int y, Rgb color, double alpha);
  // Row-major RGB bytes, 3 per pixel: [height, width, 3].
  const std::vector<uint8_t>& pixels() const { return pixels_; }

 private:
  int width_;
  int height_;
  std::vector<uint8_t> pixels_;  // [height, width, 3]
};

void FillRect(Canvas& canvas, const RectI& rect, Rgb color);
// A 1-pixel outline just inside `rect`.
void StrokeRect(Canvas& canvas, const RectI& rect, Rgb color);

// An anti-aliased polyline of the given width through `points`, clipped to `clip`. Overlapping
// segments are composited once (coverage is the maximum over segments), so joints do not darken.
void DrawPolyline(Canvas& canvas, const std::vector<PointF>& points, Rgb color, double width_px,
                  const RectI& clip);
// An anti-aliased filled disc, clipped to `clip`.
void DrawDot(Canvas& canvas, PointF center, double radius_px, Rgb color, const RectI& clip);

// Text in the bitmap font at integer `scale` (>= 1). (x, y) is the top-left of the first glyph's
// cell; the cell is kGlyphHeight * scale tall, of which kGlyphAscent * scale are above the
// baseline.
void DrawText(Canvas& canvas, int x, int y, const std::string& text, Rgb color, int scale);
// The same text turned 90 degrees counter-clockwise (reads bottom to top). (x, y) is the top-left
// of the rotated text's bounding box, which is TextHeight() wide and TextWidth() tall.
void DrawTextUp(Canvas& canvas, int x, int y, const std::string& text, Rgb color, int scale);
int TextWidth(const std::string& text, int scale);
int TextHeight(int scale);
// `text`, shortened to end in "..." where needed to be at most `max_width` pixels wide at `scale`.
std::string FitText(std::string text, int max_width, int scale);

}  // namespace tandem::trainer::internal
