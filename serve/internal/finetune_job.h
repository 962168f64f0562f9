// FineTuneTrainer: the training side of one co-serving fine-tuning job (private to serve/): a
// LoRA adapter in a peft::AdapterSet over the engine's frozen base model, its AdamW moments, the
// data order and the progress. An S2FT job trains its blocks in LoRA form (peft::S2ftAsLora) in
// the same set: the one-hot factor of each block is frozen (no AdamW step), the other is the
// block; the base is never permuted, since inference shares it. The engine's fine-tuning thread
// calls StepMicroBatch within what inference leaves over; the adapter is attached to the
// LlamaModel only while a micro-batch is in progress.
//
// Data order: epoch e visits the examples in a permutation drawn from DeriveSeed(seed, e,
// "ft-order"); one optimizer step takes the next batch_size examples of the epoch (fewer at its
// end), in micro-batches of at most micro_batch_tokens padded tokens (at least one row). The loss
// of a step is the mean over its target tokens (gradients scaled by 1 / targets of the whole step).
//
// State file (`<state dir>/<job>/state`, written to state.tmp then renamed):
//   line 1: "tandem-finetune-state 1"
//   line 2: one JSON object: status, error, step, epoch, pos, trained_tokens, loss, step_losses,
//           published, params: [{"name", "numel"}] in the adapter's parameter order
//   then, per parameter in that order, three little-endian f32 arrays of numel values: the
//   master weight, AdamW's m, AdamW's v.
// Snapshots are taken only between optimizer steps (the gradient of a step in progress is not
// saved); a resumed job redoes the steps after its last snapshot, with the same data.
//
// Ownership: owns its adapter set and moments on the engine's training context (which must
// outlive it). Thread-safety: one thread (the engine's fine-tuning thread). Host copies go through
// the context's stream (CopyToHostOn), never a device-wide wait.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/status.h"
#include "core/tensor.h"
#include "model/llama.h"
#include "ops/context.h"
#include "peft/adapter_set.h"
#include "peft/s2ft.h"
#include "serve/finetune.h"

namespace tandem::serve::internal {

struct FineTuneProgress {
  int64_t step = 0;   // optimizer steps done
  int64_t epoch = 0;  // epochs completed
  int64_t pos = 0;    // examples of the current epoch consumed by completed steps
  int64_t trained_tokens = 0;
  double loss = 0;
  std::vector<double> step_losses;
  std::vector<std::string> published;
};

struct MicroBatchResult {
  int64_t tokens = 0;       // real (unpadded) tokens
  bool step_done = false;   // an optimizer step completed
  bool epoch_done = false;  // ... and it ended an epoch
};

class FineTuneTrainer {
 public:
  ~FineTuneTrainer();
  // model: the engine's base (its config; S2FT's "weight" selection reads its weights).
  static StatusOr<std::unique_ptr<FineTuneTrainer>> Create(ops::Context& ctx,
                                                           model::LlamaModel& model,
                                                           const FineTuneJobSpec& spec,
                                                           const std::string& base_name);

  int64_t steps_per_epoch() const;
  int64_t total_steps() const { return steps_per_epoch() * spec_.hyper.n_epochs; }
  bool done() const { return progress_.epoch >= spec_.hyper.n_epochs; }
  // Padded tokens (rows x longest row) the next RunMicroBatch will take.
  int64_t NextMicroTokens(int64_t micro_batch_tokens) const;
  StatusOr<MicroBatchResult> RunMicroBatch(model::LlamaModel& model, int64_t micro_batch_tokens);
  // The same micro-batch in pieces of at most `max_units` of the model's forward/backward units
  // (LlamaModel::ContinueForwardBackward), so that serving steps run between them: starts the
  // next micro-batch when none is in progress, and returns its result once it completes (nullopt
  // before). The adapter stays attached to `model` while a micro-batch is in progress.
  StatusOr<std::optional<MicroBatchResult>> StepMicroBatch(model::LlamaModel& model,
                                                           int64_t micro_batch_tokens,
                                                           int64_t max_units);
  bool in_micro_batch() const { return micro_model_ != nullptr; }
  // Drops a micro-batch in progress (its gradients are discarded with the step it belongs to)
  // and detaches the adapter; the step restarts from its first micro-batch.
  void Abandon();

  FineTuneProgress& progress() { return progress_; }
  const peft::LoraAdapter& adapter() const { return set_->adapter(0); }
  // Writes the adapter as it stands: PEFT LoRA files, or for an S2FT job an S2FT adapter
  // directory (peft/s2ft_io.h) with the blocks taken from their LoRA form.
  Status Save(const std::string& dir) const;

  Status WriteState(const std::string& path, const std::string& status,
                    const std::string& error) const;
  // Restores weights, moments and progress; returns the status recorded in the file.
  StatusOr<std::string> ReadState(const std::string& path);

 private:
  FineTuneTrainer(ops::Context& ctx, const FineTuneJobSpec& spec) : ctx_(ctx), spec_(spec) {}
  // Example index of the k-th example visited in `epoch`.
  int64_t Order(int64_t epoch, int64_t k) const;
  // Rows of the next micro-batch (from cursor_ in the current step).
  int64_t NextRows(int64_t micro_batch_tokens, int64_t* max_len) const;
  int64_t StepSize() const;
  Status BeginStep();
  // Builds the next micro-batch, attaches the adapter and begins the model's pass.
  Status StartMicroBatch(model::LlamaModel& model, int64_t micro_batch_tokens);
  Status OptimizerStep(MicroBatchResult* result);

  ops::Context& ctx_;
  const FineTuneJobSpec& spec_;  // owned by the engine's job entry, outlives the trainer
  std::unique_ptr<peft::AdapterSet> set_;
  std::unique_ptr<peft::S2ftAdapter> s2ft_;  // S2FT jobs: the selection and export buffers
  std::vector<int> s2ft_param_;              // S2FT jobs: per block, the LoRA parameter it is
  std::vector<bool> frozen_;                 // per adapter parameter: no optimizer step
  std::vector<Tensor> m_, v_;                // f32, per adapter parameter
  FineTuneProgress progress_;
  // The micro-batch in progress (StepMicroBatch): the model it runs on, its real tokens and rows.
  model::LlamaModel* micro_model_ = nullptr;
  int64_t micro_tokens_ = 0, micro_rows_ = 0;
  // The optimizer step in flight.
  bool in_step_ = false;
  int64_t cursor_ = 0;        // examples of this step already through forward+backward
  int64_t step_targets_ = 0;  // target tokens of the whole step
  double step_loss_sum_ = 0;
  int64_t step_loss_count_ = 0;
  mutable int64_t order_epoch_ = -1;
  mutable std::vector<int64_t> order_;
};

// What line 2 of a state file says (progress without weights).
struct FineTuneStateMeta {
  std::string status, error;
  FineTuneProgress progress;
};
StatusOr<FineTuneStateMeta> ReadFineTuneStateMeta(const std::string& path);

// The S2FT configuration of a job's hyperparameters (the seed derived from h.seed).
peft::S2ftConfig S2ftConfigOf(const FineTuneHyperparameters& h, const std::string& base_name);
FineTuneProgress ProgressFromJson(const nlohmann::json& meta);

// `<state dir>/<job>/job.json`: {"id", "created_at", "training_file", "adapter", "method",
// "hyperparameters", "examples": [{"tokens", "loss_from"}]}, written once when the job is made;
// `<state dir>/<job>/final.json`: {"status", "error", "finished_at"}, written when it ends. Both
// through a temp file and a rename.
nlohmann::json HyperparametersToJson(const FineTuneHyperparameters& h);
StatusOr<FineTuneHyperparameters> HyperparametersFromJson(const nlohmann::json& j);
Status WriteJobFile(const std::string& dir, const FineTuneJobInfo& info,
                    const FineTuneJobSpec& spec);
Status WriteFinalFile(const std::string& dir, const FineTuneJobInfo& info);
// Reads job.json into spec (with examples) and info (id, created_at), and final.json's status
// when there is one (else info->status is "queued").
Status ReadJobFiles(const std::string& dir, FineTuneJobSpec* spec, FineTuneJobInfo* info);

// A job as the engine holds it.
struct FineTuneJobEntry {
  FineTuneJobSpec spec;                      // immutable once queued
  FineTuneJobInfo info;                      // guarded by the engine's mutex
  bool cancel_requested = false;             // guarded by the engine's mutex
  std::unique_ptr<FineTuneTrainer> trainer;  // engine thread; while the job runs
};

}  // namespace tandem::serve::internal
