// Tests for `tandem plot`: the PNG encoder (decoded here independently with zlib), the raster and
// font, tick selection and labels, metrics.jsonl parsing and its errors, and the whole plot.
#include "trainer/plot.h"

#include <gtest/gtest.h>
#include <zlib.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <sstream>

#include "tests/common/testing.h"
#include "trainer/internal/plot_axes.h"
#include "trainer/internal/plot_figure.h"
#include "trainer/internal/plot_metrics.h"
#include "trainer/internal/png_writer.h"
#include "trainer/internal/raster.h"
#include "trainer/internal/raster_font.h"

namespace tandem::trainer {
namespace {

using internal::Canvas;
using internal::PointF;
using internal::RectI;
using internal::Rgb;

constexpr Rgb kWhite{255, 255, 255};

uint64_t FreshSeed() { return (uint64_t{std::random_device{}()} << 32) ^ std::random_device{}(); }

uint32_t ReadU32(const std::string& b, size_t at) {
  return (uint32_t{static_cast<uint8_t>(b[at])} << 24) |
         (uint32_t{static_cast<uint8_t>(b[at + 1])} << 16) |
         (uint32_t{static_cast<uint8_t>(b[at + 2])} << 8) |
         uint32_t{static_cast<uint8_t>(b[at + 3])};
}

struct DecodedPng {
  int width = 0;
  int height = 0;
  size_t inflated_bytes = 0;
  std::set<int> filters;     // row filter types seen
  std::vector<uint8_t> rgb;  // [height, width, 3]
  Rgb At(int x, int y) const {
    const size_t i = (static_cast<size_t>(y) * width + x) * 3;
    return {rgb[i], rgb[i + 1], rgb[i + 2]};
  }
};

// An independent reader for what EncodePng may write: RGB8, filters None and Sub.
::testing::AssertionResult DecodePng(const std::string& bytes, DecodedPng* out) {
  if (bytes.size() < 8 || bytes.compare(0, 8, std::string("\x89PNG\r\n\x1a\n", 8)) != 0) {
    return ::testing::AssertionFailure() << "missing PNG signature";
  }
  std::string idat;
  std::vector<std::string> types;
  for (size_t at = 8; at < bytes.size();) {
    if (at + 12 > bytes.size()) return ::testing::AssertionFailure() << "truncated chunk at " << at;
    const uint32_t length = ReadU32(bytes, at);
    const std::string type = bytes.substr(at + 4, 4);
    const std::string data = bytes.substr(at + 8, length);
    const uint32_t crc = ReadU32(bytes, at + 8 + length);
    const uLong want = crc32(0L, reinterpret_cast<const Bytef*>(bytes.data() + at + 4), length + 4);
    if (crc != want) return ::testing::AssertionFailure() << "bad CRC on chunk " << type;
    types.push_back(type);
    if (type == "IHDR") {
      if (length != 13) return ::testing::AssertionFailure() << "IHDR length " << length;
      out->width = static_cast<int>(ReadU32(data, 0));
      out->height = static_cast<int>(ReadU32(data, 4));
      if (data.substr(8) != std::string("\x08\x02\x00\x00\x00", 5)) {
        return ::testing::AssertionFailure() << "IHDR is not RGB8, deflate, non-interlaced";
      }
    }
    if (type == "IDAT") idat += data;
    at += 12 + length;
  }
  if (types.empty() || types.front() != "IHDR" || types.back() != "IEND") {
    return ::testing::AssertionFailure() << "chunks must run IHDR ... IEND";
  }
  const size_t stride = static_cast<size_t>(out->width) * 3;
  const size_t expected = (1 + stride) * out->height;
  std::vector<uint8_t> raw(expected + 16);  // room to notice extra bytes
  uLongf raw_size = raw.size();
  const int rc =
      uncompress(raw.data(), &raw_size, reinterpret_cast<const Bytef*>(idat.data()), idat.size());
  if (rc != Z_OK) return ::testing::AssertionFailure() << "inflate failed: " << rc;
  out->inflated_bytes = raw_size;
  if (raw_size != expected) {
    return ::testing::AssertionFailure()
           << "inflated " << raw_size << " bytes, expected " << expected;
  }
  out->rgb.resize(stride * out->height);
  for (int y = 0; y < out->height; ++y) {
    const uint8_t filter = raw[y * (1 + stride)];
    const uint8_t* in = &raw[y * (1 + stride) + 1];
    uint8_t* row = &out->rgb[y * stride];
    if (filter > 1)
      return ::testing::AssertionFailure() << "row " << y << " filter " << int{filter};
    out->filters.insert(filter);
    for (size_t i = 0; i < stride; ++i) {
      row[i] = static_cast<uint8_t>(in[i] + (filter == 1 && i >= 3 ? row[i - 3] : 0));
    }
  }
  return ::testing::AssertionSuccess();
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void WriteAll(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

// ---------------------------------------------------------------------------------------------
// PNG encoder

TEST(PngWriterTest, RandomImagesRoundTripExactly) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  std::set<int> filters_seen;
  for (int trial = 0; trial < 12; ++trial) {
    const int w = 1 + static_cast<int>(rng() % 70), h = 1 + static_cast<int>(rng() % 50);
    std::vector<uint8_t> rgb(static_cast<size_t>(w) * h * 3);
    const bool noise = trial % 2 == 0;  // noise favours None, gradients favour Sub
    for (size_t i = 0; i < rgb.size(); ++i) {
      rgb[i] = noise ? static_cast<uint8_t>(rng()) : static_cast<uint8_t>(i / 3 % w * 3 + trial);
    }
    StatusOr<std::string> png = internal::EncodePng(w, h, rgb);
    ASSERT_TRUE(png.ok()) << png.status().ToString();
    DecodedPng decoded;
    ASSERT_TRUE(DecodePng(*png, &decoded));
    EXPECT_EQ(decoded.width, w);
    EXPECT_EQ(decoded.height, h);
    EXPECT_EQ(decoded.rgb, rgb) << "trial " << trial << " " << w << "x" << h;
    filters_seen.insert(decoded.filters.begin(), decoded.filters.end());
  }
  EXPECT_EQ(filters_seen, (std::set<int>{0, 1})) << "both row filters should be exercised";
}

// ---------------------------------------------------------------------------------------------
// Raster and font

TEST(RasterTest, PolylineJointsAreCompositedOnce) {
  // A polyline through a midpoint covers exactly what the single segment covers.
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> coord(5, 55);
  for (int trial = 0; trial < 8; ++trial) {
    const PointF a{coord(rng), coord(rng)}, b{coord(rng), coord(rng)};
    const PointF mid{(a.x + b.x) / 2, (a.y + b.y) / 2};
    Canvas one(60, 60, kWhite), two(60, 60, kWhite);
    internal::DrawPolyline(one, {a, b}, {200, 30, 30}, 2.0, one.bounds());
    internal::DrawPolyline(two, {a, mid, b}, {200, 30, 30}, 2.0, two.bounds());
    ASSERT_EQ(one.pixels(), two.pixels()) << "trial " << trial;
    int full = 0;
    for (int y = 0; y < 60; ++y) {
      for (int x = 0; x < 60; ++x) full += one.At(x, y) == Rgb{200, 30, 30};
    }
    // A 2-pixel line fully covers the pixel centres within 0.5 of it: about one per unit length.
    EXPECT_GE(full, static_cast<int>(0.7 * std::hypot(b.x - a.x, b.y - a.y))) << "trial " << trial;
  }
}

TEST(RasterTest, ClipRectangleBoundsTheLine) {
  Canvas c(40, 40, kWhite);
  const RectI clip{10, 10, 30, 30};
  internal::DrawPolyline(c, {{0, 0}, {39, 39}}, {0, 0, 0}, 3.0, clip);
  internal::DrawDot(c, {10, 30}, 6, {0, 0, 0}, clip);
  for (int y = 0; y < 40; ++y) {
    for (int x = 0; x < 40; ++x) {
      if (!clip.Contains(x, y)) {
        ASSERT_EQ(c.At(x, y), kWhite) << x << "," << y;
      }
    }
  }
  EXPECT_EQ(c.At(20, 20), (Rgb{0, 0, 0}));
}

TEST(RasterTest, TextMatchesGlyphsAndRotates) {
  const std::string text = "Loss 1.2e-03 tokens/s (50%)";
  for (int scale : {1, 2, 3}) {
    const int w = internal::TextWidth(text, scale), h = internal::TextHeight(scale);
    Canvas flat(w, h, kWhite), up(h, w, kWhite);
    internal::DrawText(flat, 0, 0, text, {0, 0, 0}, scale);
    internal::DrawTextUp(up, 0, 0, text, {0, 0, 0}, scale);
    for (size_t i = 0; i < text.size(); ++i) {
      const char* const* rows = internal::GlyphRows(text[i]);
      for (int gy = 0; gy < internal::kGlyphHeight; ++gy) {
        for (int gx = 0; gx < internal::kGlyphWidth; ++gx) {
          const int x = (static_cast<int>(i) * internal::kGlyphAdvance + gx) * scale;
          const int y = gy * scale;
          const Rgb want = rows[gy][gx] == '#' ? Rgb{0, 0, 0} : kWhite;
          ASSERT_EQ(flat.At(x + scale - 1, y + scale - 1), want) << text[i] << " scale " << scale;
          // Counter-clockwise: (x, y) of the flat text lands at (y, w - 1 - x).
          ASSERT_EQ(up.At(y, w - 1 - x), want) << text[i] << " scale " << scale;
        }
      }
    }
  }
  std::set<std::string> distinct;  // no glyph is a copy of another
  for (int c = ' '; c <= '~'; ++c) {
    std::string bits;
    for (int row = 0; row < internal::kGlyphHeight; ++row) bits += internal::GlyphRows(c)[row];
    distinct.insert(bits);
  }
  EXPECT_EQ(distinct.size(), 95u);
  EXPECT_EQ(internal::GlyphRows('\x01'), internal::GlyphRows('?'));
}

// ---------------------------------------------------------------------------------------------
// Ticks and labels

TEST(PlotAxesTest, NiceTicksAreOneTwoFiveTimesAPowerOfTen) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> unit(-1, 1), decade(-8, 8);
  for (int trial = 0; trial < 500; ++trial) {
    const double scale = std::pow(10.0, decade(rng));
    double lo = unit(rng) * scale, hi = unit(rng) * scale;
    if (lo > hi) std::swap(lo, hi);
    if (!(hi - lo > 1e-6 * scale)) continue;
    const int target = 2 + static_cast<int>(rng() % 9);
    const internal::Ticks t = internal::NiceTicks({lo, hi}, target);
    const double mantissa = t.step / std::pow(10.0, std::floor(std::log10(t.step) + 1e-9));
    EXPECT_TRUE(std::fabs(mantissa - 1) < 1e-6 || std::fabs(mantissa - 2) < 1e-6 ||
                std::fabs(mantissa - 5) < 1e-6)
        << "step " << t.step << " for [" << lo << ", " << hi << "]";
    ASSERT_GE(static_cast<int>(t.values.size()), target / 2) << "[" << lo << ", " << hi << "]";
    EXPECT_LE(static_cast<int>(t.values.size()), 2 * target + 1) << "[" << lo << ", " << hi << "]";
    for (size_t i = 0; i < t.values.size(); ++i) {
      EXPECT_GE(t.values[i], lo - 1e-9 * t.step);
      EXPECT_LE(t.values[i], hi + 1e-9 * t.step);
      EXPECT_NEAR(t.values[i] / t.step, std::round(t.values[i] / t.step), 1e-6);
      if (i > 0) {
        EXPECT_NEAR(t.values[i] - t.values[i - 1], t.step, 1e-9 * t.step);
      }
    }
  }
  const internal::Ticks steps = internal::NiceTicks({0.5, 3.2}, 10, 1.0);
  EXPECT_EQ(steps.step, 1.0);
  EXPECT_EQ(steps.values, (std::vector<double>{1, 2, 3}));
}

TEST(PlotAxesTest, TickLabels) {
  EXPECT_EQ(internal::FormatTick(0.0012, 0.0002, 0.002), "1.2e-03");
  EXPECT_EQ(internal::FormatTick(0.001, 0.001, 0.003), "1e-03");
  EXPECT_EQ(internal::FormatTick(3e6, 1e6, 5e6), "3e+06");
  EXPECT_EQ(internal::FormatTick(0.0, 0.0002, 0.002), "0");
  EXPECT_EQ(internal::FormatTick(1e-20, 0.5, 2), "0");
  EXPECT_EQ(internal::FormatTick(2.5, 0.5, 10), "2.5");
  EXPECT_EQ(internal::FormatTick(-0.5, 0.5, 1), "-0.5");
  EXPECT_EQ(internal::FormatTick(0.05, 0.01, 0.1), "0.05");
  EXPECT_EQ(internal::FormatTick(12000, 2000, 20000), "12000");
  EXPECT_EQ(internal::FormatTick(400, 100, 1000), "400");
}

TEST(PlotAxesTest, DecimationKeepsTheEnvelope) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> y(0, 100);
  std::vector<PointF> points;
  for (int i = 0; i < 5000; ++i) points.push_back({i / 50.0, y(rng)});  // 50 points a column
  const std::vector<PointF> kept = internal::DecimateByColumn(points);
  EXPECT_LE(kept.size(), 4u * 100);
  for (int column = 0; column < 100; ++column) {
    double lo = 1e9, hi = -1e9, kept_lo = 1e9, kept_hi = -1e9;
    for (const PointF& p : points) {
      if (std::floor(p.x) == column) lo = std::min(lo, p.y), hi = std::max(hi, p.y);
    }
    for (const PointF& p : kept) {
      if (std::floor(p.x) == column)
        kept_lo = std::min(kept_lo, p.y), kept_hi = std::max(kept_hi, p.y);
    }
    EXPECT_EQ(lo, kept_lo) << "column " << column;
    EXPECT_EQ(hi, kept_hi) << "column " << column;
  }
  EXPECT_EQ(kept.front().y, points.front().y);
  EXPECT_EQ(kept.back().y, points.back().y);
}

// ---------------------------------------------------------------------------------------------
// metrics.jsonl

TEST(PlotMetricsTest, RepeatedStepsKeepTheLastValueAndAPartialLastLineIsSkipped) {
  const std::string text =
      "{\"step\": 1, \"loss\": 5.0, \"lr\": 0.001}\n"
      "{\"step\": 2, \"loss\": 4.0, \"tokens_per_s\": 100}\n"
      "\n"
      "{\"step\": 3, \"loss\": 3.0, \"eval_loss\": 3.5}\n"
      "{\"step\": 2, \"loss\": 4.5, \"tokens_per_s\": null}\n"  // resumed after step 1
      "{\"step\": 3, \"loss\": null, \"grad_norm\": 0.7, \"note\": \"x\"}\r\n"
      "{\"step\": 4, \"lo";
  StatusOr<internal::RunMetrics> m = internal::ParseRunMetrics(text, "run/metrics.jsonl");
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  ASSERT_EQ(m->loss.size(), 3u);
  EXPECT_EQ(m->loss[1].step, 2);
  EXPECT_EQ(m->loss[1].value, 4.5);
  EXPECT_EQ(m->loss[2].value, 3.0);  // a null does not erase an earlier value
  ASSERT_EQ(m->tokens_per_s.size(), 1u);
  EXPECT_EQ(m->tokens_per_s[0].value, 100);
  ASSERT_EQ(m->eval_loss.size(), 1u);
  EXPECT_EQ(m->grad_norm.size(), 1u);
  EXPECT_EQ(m->lr.size(), 1u);
  EXPECT_EQ(m->num_records, 5);
}

TEST(PlotMetricsTest, MalformedLinesNameFileAndLine) {
  const std::string good = "{\"step\": 1, \"loss\": 2.0}\n";
  const struct {
    std::string text;
    std::string line;
    std::string mentions;
  } cases[] = {
      {good + good + "{\"step\": 3, \"loss\": }\n", ":3:", "malformed JSON"},
      {good + "{\"loss\": 2.0}\n", ":2:", "\"step\""},
      {good + "{\"step\": \"7\", \"loss\": 2.0}\n", ":2:", "\"step\""},
      {good + "{\"step\": 1.5, \"loss\": 2.0}\n", ":2:", "\"step\""},
      {"{\"step\": 1, \"loss\": \"2.0\"}\n", ":1:", "\"loss\""},
      {good + "[1, 2]\n", ":2:", "JSON object"},
      {good + "{\"step\": 2, \"lr\": [0.1]}\n" + good, ":2:", "\"lr\""},
  };
  for (const auto& c : cases) {
    Status s = internal::ParseRunMetrics(c.text, "r/metrics.jsonl").status();
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << c.text;
    EXPECT_NE(s.message().find("r/metrics.jsonl" + c.line), std::string::npos) << s.ToString();
    EXPECT_NE(s.message().find(c.mentions), std::string::npos) << s.ToString();
  }
}

TEST(PlotMetricsTest, NoUsablePoints) {
  for (const std::string text : {"", "\n\n", "{\"step\": 1, \"loss\": null, \"lr\": 0.1}\n",
                                 "{\"step\": 1, \"tokens_per_s\": 10}\n"}) {
    Status s = internal::ParseRunMetrics(text, "r/metrics.jsonl").status();
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << text;
    EXPECT_NE(s.message().find("no usable points"), std::string::npos) << s.ToString();
  }
}

TEST(PlotMetricsTest, SmoothedLossReducesNoiseWithoutLag) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> noise(0, 0.3);
  std::vector<internal::Sample> raw, constant;
  for (int i = 0; i < 1000; ++i) {
    raw.push_back({i + 1, 8.0 - 0.005 * i + noise(rng)});  // a falling line: no lag expected
    constant.push_back({i + 1, 2.5});
  }
  for (const internal::Sample& x : internal::SmoothLoss(constant)) EXPECT_NEAR(x.value, 2.5, 1e-12);
  const std::vector<internal::Sample> smooth = internal::SmoothLoss(raw);
  ASSERT_EQ(smooth.size(), raw.size());
  double raw_dev = 0, smooth_dev = 0, bias = 0;
  for (size_t i = 0; i < raw.size(); ++i) {
    EXPECT_EQ(smooth[i].step, raw[i].step);
    if (i < 100 || i >= 900) continue;  // ends: five time constants
    const double truth = 8.0 - 0.005 * static_cast<double>(i);
    raw_dev += std::fabs(raw[i].value - truth);
    smooth_dev += std::fabs(smooth[i].value - truth);
    bias += smooth[i].value - truth;
  }
  EXPECT_LT(smooth_dev, raw_dev / 3);
  // A one-sided EMA would trail by about 20 points here, i.e. sit 0.1 above the line.
  EXPECT_LT(std::fabs(bias / 800), 0.03);
}

// ---------------------------------------------------------------------------------------------
// The whole plot

struct RunSpec {
  int steps = 200;
  bool eval = true;
  bool lr = true;
  bool tokens = true;
};

// A plausible run: decaying noisy loss, eval every 20 steps, throughput around a random level,
// warmup-then-cosine lr, as the trainer's MetricsWriter writes them.
std::string MakeMetrics(const RunSpec& spec, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> u(0, 1);
  const double start = 8 + 4 * u(rng), floor = 1.5 + u(rng), level = 5e3 + 5e4 * u(rng);
  std::ostringstream out;
  for (int step = 1; step <= spec.steps; ++step) {
    const double loss =
        floor + (start - floor) * std::exp(-step / (0.2 * spec.steps)) + 0.6 * u(rng);
    out << "{\"step\": " << step << ", \"loss\": " << loss;
    if (spec.lr) {
      const double lr = step < 10 ? 1e-3 * step / 10
                                  : 1e-4 + 9e-4 * 0.5 * (1 + std::cos(M_PI * step / spec.steps));
      out << ", \"lr\": " << lr;
    }
    out << ", \"grad_norm\": " << 0.5 + u(rng);
    if (spec.tokens) out << ", \"tokens_per_s\": " << level * (0.9 + 0.2 * u(rng));
    if (spec.eval && step % 20 == 0) out << ", \"eval_loss\": " << loss + 0.1 + 0.1 * u(rng);
    out << "}\n";
  }
  return out.str();
}

int CountColor(const DecodedPng& png, const RectI& r, Rgb color) {
  int n = 0;
  for (int y = r.y0; y < r.y1; ++y) {
    for (int x = r.x0; x < r.x1; ++x) n += png.At(x, y) == color;
  }
  return n;
}

TEST(PlotRunTest, WritesAPngWithEveryPanelDrawn) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  testing::TempDir tmp;
  const std::string run = tmp.Join("llama-lora_run-7");
  std::filesystem::create_directory(run);
  RunSpec spec;
  spec.steps = 100 + static_cast<int>(rng() % 400);
  WriteAll(run + "/metrics.jsonl", MakeMetrics(spec, rng));
  PlotOptions options;
  options.width = 900 + static_cast<int>(rng() % 500);
  options.height = 600 + static_cast<int>(rng() % 400);
  const std::string out = tmp.Join("plot.png");
  const Status s = PlotRun(run + "/", out, options);
  ASSERT_TRUE(s.ok()) << s.ToString();

  DecodedPng png;
  ASSERT_TRUE(DecodePng(ReadAll(out), &png));
  EXPECT_EQ(png.width, options.width);
  EXPECT_EQ(png.height, options.height);
  EXPECT_EQ(png.inflated_bytes, static_cast<size_t>(options.height) * (1 + 3 * options.width));

  // The file is exactly the rendering, whose layout tells where each panel is.
  StatusOr<internal::RunMetrics> m = internal::ReadRunMetrics(run + "/metrics.jsonl");
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  const internal::RenderedPlot plot =
      internal::RenderRunPlot(*m, "llama-lora_run-7", options.width, options.height);
  ASSERT_EQ(plot.canvas.pixels(), png.rgb);
  ASSERT_EQ(plot.frames.size(), 3u);
  const RectI loss = plot.frames[0].mapping.plot, tps = plot.frames[1].mapping.plot,
              lr = plot.frames[2].mapping.plot;
  EXPECT_LE(loss.y1, tps.y0);
  EXPECT_LE(tps.y1, lr.y0);
  EXPECT_GT(CountColor(png, loss, internal::kLossColor), loss.width() / 4);
  EXPECT_GT(CountColor(png, loss, internal::kLossRawColor), loss.width() / 10);
  EXPECT_GT(CountColor(png, loss, internal::kEvalLossColor), loss.width() / 4);
  EXPECT_GT(CountColor(png, tps, internal::kThroughputColor), tps.width() / 2);
  EXPECT_GT(CountColor(png, lr, internal::kLrColor), lr.width() / 2);
  for (const RectI& r : {loss, tps}) EXPECT_EQ(CountColor(png, r, internal::kLrColor), 0);
  for (const RectI& r : {loss, lr}) EXPECT_EQ(CountColor(png, r, internal::kThroughputColor), 0);
  // Title, tick labels and axis labels put ink outside the data areas.
  EXPECT_GT(png.width * loss.y0 - CountColor(png, {0, 0, png.width, loss.y0}, kWhite), 200);
  EXPECT_GT(loss.x0 * png.height - CountColor(png, {0, 0, loss.x0, png.height}, kWhite), 300);

  // Every throughput point lies on its drawn line.
  for (const internal::Sample& sample : m->tokens_per_s) {
    const PointF p = plot.frames[1].mapping.ToPixel(static_cast<double>(sample.step), sample.value);
    const RectI near{static_cast<int>(p.x) - 2, static_cast<int>(p.y) - 2,
                     static_cast<int>(p.x) + 3, static_cast<int>(p.y) + 3};
    ASSERT_GT(CountColor(png, near, internal::kThroughputColor), 0) << "step " << sample.step;
  }
}

TEST(PlotRunTest, TwoPanelsWithoutLrAndTinyRuns) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  for (const RunSpec spec : {RunSpec{50, false, false, true}, RunSpec{3, false, true, false},
                             RunSpec{1, false, true, true}}) {
    testing::TempDir tmp;
    WriteAll(tmp.Join("metrics.jsonl"), MakeMetrics(spec, rng));
    const Status s = PlotRun(tmp.path(), tmp.Join("p.png"), {640, 480});
    ASSERT_TRUE(s.ok()) << s.ToString();
    DecodedPng png;
    ASSERT_TRUE(DecodePng(ReadAll(tmp.Join("p.png")), &png));
    EXPECT_EQ(png.width, 640);
    EXPECT_EQ(png.height, 480);
    StatusOr<internal::RunMetrics> m = internal::ReadRunMetrics(tmp.Join("metrics.jsonl"));
    ASSERT_TRUE(m.ok());
    const internal::RenderedPlot plot = internal::RenderRunPlot(*m, "x", 640, 480);
    ASSERT_EQ(plot.frames.size(), spec.lr ? 3u : 2u) << spec.steps;
    const DecodedPng& p = png;
    EXPECT_GT(CountColor(p, plot.frames[0].mapping.plot, internal::kLossColor), 0) << spec.steps;
    EXPECT_EQ(CountColor(p, {0, 0, 640, 480}, internal::kEvalLossColor), 0);
    EXPECT_EQ(CountColor(p, {0, 0, 640, 480}, internal::kLrColor) > 0, spec.lr);
    EXPECT_EQ(CountColor(p, {0, 0, 640, 480}, internal::kThroughputColor) > 0, spec.tokens);
  }
}

TEST(PlotRunTest, Errors) {
  testing::TempDir tmp;
  Status missing = PlotRun(tmp.path(), tmp.Join("p.png"));
  EXPECT_EQ(missing.code(), StatusCode::kNotFound);
  EXPECT_NE(missing.message().find(tmp.Join("metrics.jsonl")), std::string::npos)
      << missing.ToString();

  WriteAll(tmp.Join("metrics.jsonl"), "{\"step\": 1, \"loss\": 2}\n{\"step\": 2 \"loss\": 1}\n");
  Status malformed = PlotRun(tmp.path(), tmp.Join("p.png"));
  EXPECT_EQ(malformed.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(malformed.message().find(tmp.Join("metrics.jsonl") + ":2:"), std::string::npos)
      << malformed.ToString();

  WriteAll(tmp.Join("metrics.jsonl"), "{\"step\": 1, \"loss\": null}\n");
  EXPECT_EQ(PlotRun(tmp.path(), tmp.Join("p.png")).code(), StatusCode::kInvalidArgument);

  WriteAll(tmp.Join("metrics.jsonl"), "{\"step\": 1, \"loss\": 2}\n");
  EXPECT_EQ(PlotRun(tmp.path(), tmp.Join("p.png"), {100, 800}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(PlotRun(tmp.path(), tmp.Join("p.png"), {1200, 100000}).code(),
            StatusCode::kInvalidArgument);
  Status unwritable = PlotRun(tmp.path(), tmp.Join("no/such/dir/p.png"));
  EXPECT_FALSE(unwritable.ok());
  EXPECT_NE(unwritable.message().find("no/such/dir/p.png"), std::string::npos)
      << unwritable.ToString();
  EXPECT_FALSE(std::filesystem::exists(tmp.Join("p.png")));
  EXPECT_EQ(DefaultPlotPath("runs/a"), "runs/a/plot.png");
}

}  // namespace
}  // namespace tandem::trainer
