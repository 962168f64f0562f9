// The multi-process side of `tandem train` (mpirun): the mesh, its communicators, the model's
// parallel hooks and optimizer, and the per-rank slicing of batches. Used by trainer.cc only when
// the world has more than one rank; a single process never touches this.
#pragma once

#include <functional>
#include <memory>

#include "collectives/communicator.h"
#include "model/llama.h"
#include "ops/context.h"
#include "parallel/mesh.h"
#include "parallel/model_hooks.h"
#include "parallel/optimizer.h"
#include "trainer/config.h"
#include "trainer/data.h"

namespace tandem::trainer::internal {

struct ParallelRun {
  collectives::Communicator* world = nullptr;               // not owned: the MPI (host) world
  std::unique_ptr<collectives::Communicator> device_world;  // NCCL over `world` on CUDA
  // CUDA with dp x cp > 1: a second NCCL world on a stream of its own, from which the dp_cp group
  // is split, so gradient buckets are reduced while backward runs (parallel/data_parallel.h).
  std::unique_ptr<collectives::Communicator> grad_world;
  parallel::MeshShape shape;
  parallel::MeshGroups groups;
  std::unique_ptr<parallel::MeshModelHooks> hooks;
  std::unique_ptr<parallel::ParallelOptimizer> optimizer;

  // World rank 0 writes logs, metrics, run.json and checkpoints.
  bool writer() const { return world->rank() == 0; }
  // The ranks of world rank 0's tp group take part in saving (tp slices are gathered).
  bool saver() const { return groups.coords.dp == 0 && groups.coords.cp == 0; }
  model::ModelParallel model_parallel() const {
    return {groups.coords.tp, shape.tp, groups.coords.cp, shape.cp, hooks.get()};
  }
  Status Close();
};

// The mesh of `p` over `world`; on a CUDA context an NCCL world on the context's stream.
StatusOr<std::unique_ptr<ParallelRun>> OpenParallelRun(const ParallelSection& p,
                                                       collectives::Communicator& world,
                                                       ops::Context& ctx, int local_rank);

// This rank's part of its dp rank's batch: the zig-zag tokens of its cp rank (positions
// global); the whole batch when cp == 1.
StatusOr<model::Batch> SliceForCp(const ParallelRun& run, const TokenBatch& batch);

// Sum of `values` over the dp x cp replicas (each tp rank holds the same).
Status SumOverReplicas(ParallelRun& run, ops::Context& ctx, std::vector<double>& values);

struct ParallelUpdate {
  model::LossSum loss;  // global
  int64_t tokens = 0;   // global
  double grad_norm = 0;
};

// One update: grad_accum micro-batches from `loader` (this dp rank's rows), gradients of the
// global mean loss reduced over the replicas, the global norm, clipping, AdamW (after
// `before_update`, when given: the snapshot fence).
StatusOr<ParallelUpdate> ParallelTrainStep(ParallelRun& run, ops::Context& ctx,
                                           model::LlamaModel& model, DataLoader& loader,
                                           int64_t grad_accum, double grad_clip, float lr,
                                           int64_t step,
                                           const std::function<Status()>& before_update = {});

// Mean held-out loss over `batches` micro-batches of every dp rank.
StatusOr<double> ParallelEvaluate(ParallelRun& run, ops::Context& ctx, model::LlamaModel& model,
                                  DataLoader& loader, int64_t batches);

}  // namespace tandem::trainer::internal
