#include "trainer/internal/step_profile.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/logging.h"

namespace tandem::trainer::internal {

StatusOr<std::unique_ptr<ops::Profiler>> StartStepProfile(ops::Context& ctx, int64_t step,
                                                          int64_t profile_step) {
  if (profile_step <= 0 || step != profile_step) return std::unique_ptr<ops::Profiler>();
  auto prof = std::make_unique<ops::Profiler>();
  TANDEM_RETURN_IF_ERROR(prof->Begin(ctx));
  return prof;
}

std::string StepProfileJson(const ops::ProfileReport& r, const std::string& device, int64_t step,
                            int64_t tokens) {
  auto percent = [&](double ms) { return r.wall_ms > 0 ? 100.0 * ms / r.wall_ms : 0.0; };
  nlohmann::json categories = nlohmann::json::array();
  for (const ops::ProfileEntry& e : r.entries) {
    categories.push_back({{"name", e.name},
                          {"calls", e.calls},
                          {"ms", e.total_ms},
                          {"percent", percent(e.total_ms)},
                          {"flops", e.flops},
                          {"tflops", e.Tflops()}});
  }
  const nlohmann::json j = {{"step", step},
                            {"device", device},
                            {"timer", r.cuda ? "cuda_events" : "steady_clock"},
                            {"wall_ms", r.wall_ms},
                            {"host_ms", r.host_ms},
                            {"regions_ms", r.regions_ms},
                            {"gap_ms", r.gap_ms},
                            {"gap_percent", percent(r.gap_ms)},
                            {"tokens", tokens},
                            {"categories", categories}};
  return j.dump(2) + "\n";
}

Status FinishStepProfile(ops::Profiler& prof, const ops::Context& ctx, int64_t step, int64_t tokens,
                         const std::string& run_dir) {
  TANDEM_RETURN_IF_ERROR(prof.End());
  TANDEM_ASSIGN_OR_RETURN(const ops::ProfileReport report, prof.Collect());
  if (run_dir.empty()) return Status::Ok();
  const std::string path = run_dir + "/profile-step-" + std::to_string(step) + ".json";
  {
    std::ofstream out(path, std::ios::trunc);
    out << StepProfileJson(report, ctx.device().ToString(), step, tokens);
    if (!out) return InternalError(StrCat("cannot write the step profile to ", path));
  }
  TANDEM_LOG(INFO, "train") << "profile of step " << step << " (" << tokens << " tokens; "
                            << (report.cuda ? "CUDA events on the context's stream" : "host clock")
                            << "; written to " << path << "):\n"
                            << report.ToTable();
  return Status::Ok();
}

}  // namespace tandem::trainer::internal
