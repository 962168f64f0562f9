#include "trainer/plot.h"

#include <filesystem>

#include "trainer/internal/plot_figure.h"
#include "trainer/internal/plot_metrics.h"
#include "trainer/internal/png_writer.h"

namespace tandem::trainer {
namespace {

namespace fs = std::filesystem;

// The run directory's own name: "runs/a/" and "runs/a/." give "a"; "." gives the working
// directory's name.
std::string RunName(const std::string& run_dir) {
  fs::path p = fs::path(run_dir).lexically_normal();
  if (!p.has_filename() && p.has_parent_path()) p = p.parent_path();
  std::string name = p.filename().string();
  if (name.empty() || name == "." || name == "..") {
    std::error_code ec;
    fs::path abs = fs::absolute(p, ec).lexically_normal();
    if (!abs.has_filename() && abs.has_parent_path()) abs = abs.parent_path();
    name = abs.filename().string();
  }
  return name.empty() ? run_dir : name;
}

}  // namespace

std::string DefaultPlotPath(const std::string& run_dir) {
  return (fs::path(run_dir) / "plot.png").string();
}

Status PlotRun(const std::string& run_dir, const std::string& out_png, const PlotOptions& options) {
  if (options.width < internal::kMinPlotWidth || options.width > internal::kMaxPlotSide ||
      options.height < internal::kMinPlotHeight || options.height > internal::kMaxPlotSide) {
    return InvalidArgumentError(StrCat("plot size must be ", internal::kMinPlotWidth, "..",
                                       internal::kMaxPlotSide, " x ", internal::kMinPlotHeight,
                                       "..", internal::kMaxPlotSide, " pixels, found ",
                                       options.width, "x", options.height));
  }
  const std::string metrics_path = (fs::path(run_dir) / "metrics.jsonl").string();
  TANDEM_ASSIGN_OR_RETURN(const internal::RunMetrics metrics,
                          internal::ReadRunMetrics(metrics_path));
  const internal::RenderedPlot plot =
      internal::RenderRunPlot(metrics, RunName(run_dir), options.width, options.height);
  TANDEM_RETURN_IF_ERROR(internal::WritePngFile(out_png, plot.canvas.width(), plot.canvas.height(),
                                                plot.canvas.pixels()));
  return Status::Ok();
}

}  // namespace tandem::trainer
