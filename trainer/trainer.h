// The training loop of `tandem train`.
//
// One process and device, or one rank of an mpirun job (TrainEnv below). Each update:
// grad_accum micro-batches of forward+backward with the loss averaged over every target token of
// the update, the global gradient norm, clipping, AdamW per parameter with the scheduled lr, then
// metrics. Deterministic: the same config and seed on the same device give bitwise-identical
// losses (no nondeterministic reductions in any op, a seeded data order).
//
// The run directory receives config.toml (resolved), run.json (git commit, build, device,
// command line), metrics.jsonl (one object per update) and checkpoints/step-N/ (HF config.json +
// model.safetensors, loadable by transformers) every save_interval updates and at the end; with
// train.universal_checkpoints also checkpoints/universal/step-N.h5 (checkpoint/universal.h: f32
// weights, Adam moments, data position, RNG state), saved in the background. train.resume
// continues a run from one of those under any mesh: the same mesh gives bitwise the losses and
// weights of an uninterrupted run; another mesh agrees within the reduction-order tolerance of
// the parallel issue's tests.
#pragma once

#include <atomic>

#include <string>
#include <vector>

#include "collectives/communicator.h"
#include "core/status.h"
#include "trainer/config.h"

namespace tandem::trainer {

struct TrainResult {
  int64_t steps_done = 0;
  double first_loss = 0;   // mean loss of the first update
  double final_loss = 0;   // mean loss of the last update
  double final_eval_loss = -1;
  // train.eval_accuracy: token accuracy on the held-out split before the first update and at
  // the last evaluation (-1 when not measured).
  double initial_eval_accuracy = -1;
  double final_eval_accuracy = -1;
  std::string last_checkpoint;
  // train.universal_checkpoints: the newest universal checkpoint this run published ("" none).
  std::string last_universal_checkpoint;
  int stopped_by_signal = 0;  // TrainEnv::stop_signal's number when it ended the run early
  int64_t resumed_from_step = 0;  // the checkpoint's step when the run resumed, else 0
};

// `command_line` is recorded in run.json. Bad configuration, data or model files fail before
// the first step with a clear error.
StatusOr<TrainResult> RunTraining(const TrainConfig& config, const std::string& command_line);

// [parallel] Where this process sits in an mpirun job. With a world of more than one rank the run
// is data x context x tensor parallel over the mesh of config.parallel (parallel/mesh.h): on CUDA
// each rank uses cuda:<local_rank> and NCCL bootstrapped over `world`. Only world rank 0 writes
// logs, metrics, run.json and checkpoints; the reported loss is the global mean. LoRA trains on
// dp x cp meshes (not with tp or ZeRO); S2FT is refused under more than one rank.
struct TrainEnv {
  collectives::Communicator* world = nullptr;  // MPI (host) world; null: one process
  int local_rank = 0;                          // rank on this node (the GPU index)
  // Set (to the signal's number) by a SIGTERM/SIGINT handler: the run stops after the update in
  // progress, saving as at the end (rank 0 decides for every rank). Null: never.
  const std::atomic<int>* stop_signal = nullptr;
};
StatusOr<TrainResult> RunTraining(const TrainConfig& config, const std::string& command_line,
                                  const TrainEnv& env);

}  // namespace tandem::trainer
