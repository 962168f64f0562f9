#include "trainer/schedule.h"

#include <algorithm>
#include <cmath>

namespace tandem::trainer {

Status ValidateSchedule(const ScheduleOptions& o) {
  if (o.kind != "cosine" && o.kind != "linear" && o.kind != "constant") {
    return InvalidArgumentError(StrCat("schedule '", o.kind, "': expected cosine, linear or constant"));
  }
  if (!(o.peak_lr > 0)) return InvalidArgumentError(StrCat("peak learning rate must be > 0, found ", o.peak_lr));
  if (o.min_lr_ratio < 0 || o.min_lr_ratio > 1) {
    return InvalidArgumentError(StrCat("min_lr_ratio must be in [0, 1], found ", o.min_lr_ratio));
  }
  if (o.warmup_steps < 0 || o.total_steps < 1) {
    return InvalidArgumentError(StrCat("need warmup_steps >= 0 and total steps >= 1, found ", o.warmup_steps,
                                       " and ", o.total_steps));
  }
  return Status::Ok();
}

double LearningRate(const ScheduleOptions& o, int64_t step) {
  if (o.warmup_steps > 0 && step <= o.warmup_steps) {
    return o.peak_lr * static_cast<double>(step) / static_cast<double>(o.warmup_steps);
  }
  if (o.kind == "constant") return o.peak_lr;
  const double min_lr = o.peak_lr * o.min_lr_ratio;
  const int64_t decay_steps = std::max<int64_t>(1, o.total_steps - o.warmup_steps);
  const double p = std::clamp(static_cast<double>(step - o.warmup_steps) / decay_steps, 0.0, 1.0);
  if (o.kind == "linear") return o.peak_lr + (min_lr - o.peak_lr) * p;
  return min_lr + (o.peak_lr - min_lr) * 0.5 * (1.0 + std::cos(M_PI * p));
}

}  // namespace tandem::trainer
