// [profile] train.profile_step: where the time of one update goes, per op category (issue #4).
//
// The trainer attaches an ops::Profiler (ops/profiler.h) to its context for the whole of the
// chosen update (forward, backward, gradient reduction, optimizer) and then logs a table
// (category, calls, ms, % of the update, TFLOP/s of GEMMs and attention) and writes the same as
// JSON to <run dir>/profile-step-N.json:
//   {"step": N, "device": "cuda:0", "timer": "cuda_events", "wall_ms": .., "host_ms": ..,
//    "regions_ms": .., "gap_ms": .., "gap_percent": .., "tokens": ..,
//    "categories": [{"name": "gemm", "calls": .., "ms": .., "percent": .., "flops": ..,
//                    "tflops": ..}, ...]}
// Only the chosen update pays for the events; every other update runs with no profiler.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "core/status.h"
#include "ops/context.h"
#include "ops/profiler.h"

namespace tandem::trainer::internal {

// A profiler already attached to `ctx` (its earlier work drained) when step == profile_step;
// null otherwise (profile_step 0 is off).
StatusOr<std::unique_ptr<ops::Profiler>> StartStepProfile(ops::Context& ctx, int64_t step,
                                                          int64_t profile_step);

// Ends the window of `prof` and waits for it; when `run_dir` is not empty (the writing rank),
// logs the table and writes run_dir/profile-step-<step>.json. `tokens`: the update's tokens.
Status FinishStepProfile(ops::Profiler& prof, const ops::Context& ctx, int64_t step, int64_t tokens,
                         const std::string& run_dir);

// The report as the JSON object above.
std::string StepProfileJson(const ops::ProfileReport& report, const std::string& device,
                            int64_t step, int64_t tokens);

}  // namespace tandem::trainer::internal
