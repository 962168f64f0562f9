// The training loop of `tandem train`.
//
// One process, one device (data/tensor/context parallelism come with parallel/). Each update:
// grad_accum micro-batches of forward+backward with the loss averaged over every target token of
// the update, the global gradient norm, clipping, AdamW per parameter with the scheduled lr, then
// metrics. Deterministic: the same config and seed on the same device give bitwise-identical
// losses (no nondeterministic reductions in any op, a seeded data order).
//
// The run directory receives config.toml (resolved), run.json (git commit, build, device,
// command line), metrics.jsonl (one object per update) and checkpoints/step-N/ (HF config.json +
// model.safetensors, loadable by transformers) every save_interval updates and at the end.
#pragma once

#include <string>
#include <vector>

#include "core/status.h"
#include "trainer/config.h"

namespace tandem::trainer {

struct TrainResult {
  int64_t steps_done = 0;
  double first_loss = 0;   // mean loss of the first update
  double final_loss = 0;   // mean loss of the last update
  double final_eval_loss = -1;
  std::string last_checkpoint;
};

// `command_line` is recorded in run.json. Bad configuration, data or model files fail before
// the first step with a clear error.
StatusOr<TrainResult> RunTraining(const TrainConfig& config, const std::string& command_line);

}  // namespace tandem::trainer
