#include "trainer/internal/raster.h"

#include <algorithm>
#include <cmath>

#include "core/status.h"
#include "trainer/internal/raster_font.h"

namespace tandem::trainer::internal {
namespace {

RectI Intersect(const RectI& a, const RectI& b) {
  RectI r{std::max(a.x0, b.x0), std::max(a.y0, b.y0), std::min(a.x1, b.x1), std::min(a.y1, b.y1)};
  if (r.x1 < r.x0) r.x1 = r.x0;
  if (r.y1 < r.y0) r.y1 = r.y0;
  return r;
}

// Pixels whose centres lie within `pad` of the box spanned by a and b, clamped to `limit`.
RectI PixelBox(PointF a, PointF b, double pad, const RectI& limit) {
  auto clamp_floor = [](double v, int lo, int hi) {
    return static_cast<int>(std::clamp(std::floor(v), double{1.0 * lo}, double{1.0 * hi}));
  };
  RectI r;
  r.x0 = clamp_floor(std::min(a.x, b.x) - pad, limit.x0, limit.x1);
  r.y0 = clamp_floor(std::min(a.y, b.y) - pad, limit.y0, limit.y1);
  r.x1 = clamp_floor(std::max(a.x, b.x) + pad + 1, limit.x0, limit.x1);
  r.y1 = clamp_floor(std::max(a.y, b.y) + pad + 1, limit.y0, limit.y1);
  return r;
}

double DistanceToSegment(PointF p, PointF a, PointF b) {
  const double dx = b.x - a.x, dy = b.y - a.y;
  const double len2 = dx * dx + dy * dy;
  double t = len2 > 0 ? ((p.x - a.x) * dx + (p.y - a.y) * dy) / len2 : 0.0;
  t = std::clamp(t, 0.0, 1.0);
  const double ex = a.x + t * dx - p.x, ey = a.y + t * dy - p.y;
  return std::sqrt(ex * ex + ey * ey);
}

bool Finite(PointF p) { return std::isfinite(p.x) && std::isfinite(p.y); }

// Calls ink(tx, ty) for every inked font pixel of `text` at scale 1, in text coordinates.
template <typename Ink>
void ForEachInk(const std::string& text, Ink ink) {
  for (size_t i = 0; i < text.size(); ++i) {
    const char* const* rows = GlyphRows(text[i]);
    for (int gy = 0; gy < kGlyphHeight; ++gy) {
      for (int gx = 0; gx < kGlyphWidth; ++gx) {
        if (rows[gy][gx] == '#') ink(static_cast<int>(i) * kGlyphAdvance + gx, gy);
      }
    }
  }
}

}  // namespace

Canvas::Canvas(int width, int height, Rgb background) : width_(width), height_(height) {
  TANDEM_CHECK_MSG(width > 0 && height > 0, "canvas size must be positive, found ", width, "x",
                   height);
  pixels_.resize(static_cast<size_t>(width) * height * 3);
  for (size_t i = 0; i < pixels_.size(); i += 3) {
    pixels_[i] = background.r;
    pixels_[i + 1] = background.g;
    pixels_[i + 2] = background.b;
  }
}

Rgb Canvas::At(int x, int y) const {
  TANDEM_CHECK(x >= 0 && x < width_ && y >= 0 && y < height_);
  const size_t i = (static_cast<size_t>(y) * width_ + x) * 3;
  return {pixels_[i], pixels_[i + 1], pixels_[i + 2]};
}

void Canvas::Blend(int x, int y, Rgb color, double alpha) {
  if (x < 0 || x >= width_ || y < 0 || y >= height_ || !(alpha > 0)) return;
  alpha = std::min(alpha, 1.0);
  const size_t i = (static_cast<size_t>(y) * width_ + x) * 3;
  const uint8_t src[3] = {color.r, color.g, color.b};
  for (int c = 0; c < 3; ++c) {
    const double v = pixels_[i + c] * (1.0 - alpha) + src[c] * alpha;
    pixels_[i + c] = static_cast<uint8_t>(std::clamp(std::lround(v), 0L, 255L));
  }
}

void FillRect(Canvas& canvas, const RectI& rect, Rgb color) {
  const RectI r = Intersect(rect, canvas.bounds());
  for (int y = r.y0; y < r.y1; ++y) {
    for (int x = r.x0; x < r.x1; ++x) canvas.Blend(x, y, color, 1.0);
  }
}

void StrokeRect(Canvas& canvas, const RectI& rect, Rgb color) {
  if (rect.width() <= 0 || rect.height() <= 0) return;
  FillRect(canvas, {rect.x0, rect.y0, rect.x1, rect.y0 + 1}, color);
  FillRect(canvas, {rect.x0, rect.y1 - 1, rect.x1, rect.y1}, color);
  FillRect(canvas, {rect.x0, rect.y0, rect.x0 + 1, rect.y1}, color);
  FillRect(canvas, {rect.x1 - 1, rect.y0, rect.x1, rect.y1}, color);
}

void DrawPolyline(Canvas& canvas, const std::vector<PointF>& points, Rgb color, double width_px,
                  const RectI& clip) {
  if (points.empty()) return;
  const double half = std::max(width_px, 0.5) / 2;
  const double pad = half + 1;
  const RectI limit = Intersect(clip, canvas.bounds());
  // The coverage mask spans the finite points' box, so each pixel is blended exactly once.
  PointF lo{1e300, 1e300}, hi{-1e300, -1e300};
  for (const PointF& p : points) {
    if (!Finite(p)) continue;
    lo = {std::min(lo.x, p.x), std::min(lo.y, p.y)};
    hi = {std::max(hi.x, p.x), std::max(hi.y, p.y)};
  }
  if (lo.x > hi.x) return;  // no finite point
  const RectI box = PixelBox(lo, hi, pad, limit);
  if (box.width() <= 0 || box.height() <= 0) return;
  std::vector<float> mask(static_cast<size_t>(box.width()) * box.height(), 0.0f);  // [h, w]
  const size_t last = points.size() == 1 ? 1 : points.size() - 1;
  for (size_t i = 0; i < last; ++i) {
    const PointF a = points[i];
    const PointF b = points.size() == 1 ? a : points[i + 1];
    if (!Finite(a) || !Finite(b)) continue;
    const RectI seg = PixelBox(a, b, pad, box);
    for (int y = seg.y0; y < seg.y1; ++y) {
      float* row = mask.data() + static_cast<size_t>(y - box.y0) * box.width();
      for (int x = seg.x0; x < seg.x1; ++x) {
        const double d = DistanceToSegment({x + 0.5, y + 0.5}, a, b);
        const float cover = static_cast<float>(std::clamp(half + 0.5 - d, 0.0, 1.0));
        row[x - box.x0] = std::max(row[x - box.x0], cover);
      }
    }
  }
  for (int y = box.y0; y < box.y1; ++y) {
    const float* row = mask.data() + static_cast<size_t>(y - box.y0) * box.width();
    for (int x = box.x0; x < box.x1; ++x) canvas.Blend(x, y, color, row[x - box.x0]);
  }
}

void DrawDot(Canvas& canvas, PointF center, double radius_px, Rgb color, const RectI& clip) {
  if (!Finite(center)) return;
  const RectI box = PixelBox(center, center, radius_px + 1, Intersect(clip, canvas.bounds()));
  for (int y = box.y0; y < box.y1; ++y) {
    for (int x = box.x0; x < box.x1; ++x) {
      const double d = std::hypot(x + 0.5 - center.x, y + 0.5 - center.y);
      canvas.Blend(x, y, color, std::clamp(radius_px + 0.5 - d, 0.0, 1.0));
    }
  }
}

int TextWidth(const std::string& text, int scale) {
  if (text.empty()) return 0;
  return (static_cast<int>(text.size()) * kGlyphAdvance - 1) * scale;
}

int TextHeight(int scale) { return kGlyphHeight * scale; }

std::string FitText(std::string text, int max_width, int scale) {
  if (TextWidth(text, scale) <= max_width) return text;
  while (!text.empty() && TextWidth(text + "...", scale) > max_width) text.pop_back();
  return text + "...";
}

void DrawText(Canvas& canvas, int x, int y, const std::string& text, Rgb color, int scale) {
  TANDEM_CHECK(scale >= 1);
  ForEachInk(text, [&](int tx, int ty) {
    FillRect(canvas, {x + tx * scale, y + ty * scale, x + (tx + 1) * scale, y + (ty + 1) * scale},
             color);
  });
}

void DrawTextUp(Canvas& canvas, int x, int y, const std::string& text, Rgb color, int scale) {
  TANDEM_CHECK(scale >= 1);
  const int width = TextWidth(text, 1);
  // Turning counter-clockwise sends text pixel (tx, ty) to (ty, width - 1 - tx).
  ForEachInk(text, [&](int tx, int ty) {
    const int rx = x + ty * scale, ry = y + (width - 1 - tx) * scale;
    FillRect(canvas, {rx, ry, rx + scale, ry + scale}, color);
  });
}

}  // namespace tandem::trainer::internal
