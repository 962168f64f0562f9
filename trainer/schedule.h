// Learning-rate schedules: linear warmup, then cosine, linear or constant.
//
//   lr(step) = peak * step / warmup                                  for step <= warmup
//   cosine:   min + (peak - min) * 0.5 * (1 + cos(pi * p))           p = (step - warmup) / (total - warmup)
//   linear:   peak + (min - peak) * p
//   constant: peak
// with min = peak * min_lr_ratio and steps counted from 1 (the first update uses lr(1)).
#pragma once

#include <cstdint>
#include <string>

#include "core/status.h"

namespace tandem::trainer {

struct ScheduleOptions {
  std::string kind = "cosine";  // cosine | linear | constant
  double peak_lr = 1e-3;
  double min_lr_ratio = 0.1;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;
};

Status ValidateSchedule(const ScheduleOptions& options);
// Learning rate of update number `step` (1-based).
double LearningRate(const ScheduleOptions& options, int64_t step);

}  // namespace tandem::trainer
