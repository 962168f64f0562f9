// A run's trained state as universal checkpoints hold it (checkpoint/universal.h): per trained
// tensor its f32 master weights and Adam moments in the logical (unsharded) shape. Each rank
// gives the pieces it owns and, on resume, reads back exactly the boxes of its own mesh, so a run
// saved under one dp x cp x tp mesh (with or without ZeRO-1) resumes under any other.
//
// Ownership of what is saved (every logical element written by exactly one rank):
//   - a piece of a sharded optimizer (ZeRO-1) by the replica that holds it; an unsharded
//     optimizer's pieces by the first dp x cp replica only (the others hold the same values);
//   - a tensor held by several tp ranks (norms, kv heads shared when num_kv_heads < tp; see
//     model::Parameter::tp_copies) by the first of them (tp_rank % tp_copies == 0);
//   - vocabulary padding rows of a vocabulary-parallel tensor by nobody.
//
// Thread-safety: the run's thread.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "checkpoint/universal.h"
#include "core/status.h"
#include "model/llama.h"
#include "ops/context.h"

namespace tandem::trainer::internal {

// Elements [begin, end) of one trained parameter's local (tp-sliced, flattened) tensor, with
// views of their f32 master and moments (host or device).
struct StatePiece {
  const model::Parameter* param = nullptr;
  int64_t begin = 0, end = 0;
  // f32 [end - begin]; with optimizer.precision = "bf16" the moments are bf16, and so is the
  // master on a device (the weight itself). Saved and restored as f32 either way.
  Tensor master, exp_avg, exp_avg_sq;
};

// The tensor the optimizer updates for `p`: its f32 master, or (optimizer.precision = "bf16" on a
// device, where there is none) the compute-dtype weight itself.
inline const Tensor& StateTensor(const model::Parameter& p) {
  return p.master.defined() ? p.master : p.weight;
}
inline Tensor& StateTensor(model::Parameter& p) { return p.master.defined() ? p.master : p.weight; }

// Where this rank sits for saving.
struct StateOwner {
  bool sharded = false;          // the pieces are this rank's ZeRO-1 shard
  bool first_replica = true;     // dp x cp rank 0
  int tp_rank = 0;
  std::string adapter;           // "" for model parameters, else the adapter's name
};

// Shards for SaveUniversal of the pieces this rank owns (views of the pieces' tensors; copy them
// to the host with checkpoint::CopyShardsToHost before the next update changes them).
std::vector<checkpoint::TensorShard> OwnedShards(const std::vector<StatePiece>& pieces,
                                                 const StateOwner& owner, int64_t step);

// Resume: every parameter's local master (and its compute copy `weight`) from the checkpoint,
// then the moments of every piece. Each tensor must exist in the checkpoint with the logical
// shape of the parameter (errors name the tensor and the file). After this, a ZeRO-1
// optimizer must reload its shard's masters (parallel::ParallelOptimizer::ReloadMasters).
Status RestoreState(ops::Context& ctx, const checkpoint::UniversalReader& reader,
                    const std::vector<model::Parameter>& params,
                    const std::vector<StatePiece>& pieces, const std::string& adapter);

// The checkpoint `train.resume` names for a run writing universal checkpoints into `dir`: ""
// (start fresh) for an empty setting, or for "auto" when `dir` holds none; else the file.
// NotFound when an explicit path has no checkpoint.
StatusOr<std::string> ResolveResume(const std::string& resume, const std::string& dir);

// Drops the lines of metrics.jsonl at `path` whose step is after `step` (a resumed run rewrites
// them); no file is fine.
Status TruncateMetricsAfter(const std::string& path, int64_t step);

// Rewrites `path` with "<step> <unix time>\n" (temporary file + rename).
Status WriteHeartbeat(const std::string& path, int64_t step);

}  // namespace tandem::trainer::internal
