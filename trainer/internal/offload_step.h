// OffloadedAdamW: the trainer's AdamW with the f32 master weights and Adam moments off the device
// (optimizer.offload = "host" or "nvme"), kept in an offload::OffloadedOptimizer (host memory, or
// a file under optimizer.nvme_path through io_uring) and updated on CPU worker threads.
//
// Setup: Create() over the model's parameters right after the model is created, then
// model.SetHostMasters(this) before InitRandom / LoadSafetensors: the initial f32 values go
// straight into the optimizer, and with ModelOptions::device_master = false a CUDA device never
// holds an f32 master copy (7B: 28 GB saved). Saving HF weights reads the f32 masters back
// (GetMaster), so nothing is lost to bf16.
//
// Update(), after backward and the global gradient norm: every trainable parameter's f32
// gradient goes to the CPU chunk by chunk. On CUDA each chunk is copied device -> pinned staging
// slab on a copy stream and handed to the optimizer by a stream callback the moment it lands;
// the worker that updates it writes the new bf16 values into the same slab and copies them to the
// device weights on an upload stream; the slab goes back to the pool when that copy is done. So
// several chunks are in flight while the workers update earlier ones, and the host waits only for
// free slabs. The context's stream then waits (on the device) for the uploads before the next
// forward. On CPU the gradients are read in place and each chunk's new f32 master is copied into
// the model weight (f32 there). Results are bitwise those of ops::AdamW on a CPU context (the
// CUDA kernel may differ by f32 ulps), with per-parameter weight decay, lr, clipping scale and
// step as the caller gives them.
//
// [overlap] Backward can feed the update: the trainer calls BeginLastBackward() before the last
// micro-batch's ForwardBackward and forwards the model's GradReadyFn to GradientsFinal(). With
// update parameters known up front (no global-norm clipping) the step starts there: each
// parameter's chunks are updated as soon as its gradient is final (CPU: read in place; CUDA:
// copied on the copy stream after an event recorded on the compute stream at that point) and the
// bf16 weights go back while backward continues; Update() then only finishes the step. With
// clipping (the scale needs every gradient) only the device -> host copies start early, into the
// free staging slabs (bounded: at most num_slabs chunks wait there, never a buffer of every
// gradient), and the update starts in Update(). Either way the result is bitwise the update
// after backward: the same CpuAdamWRange over the same final gradients.
//
// [delayed] optimizer.delayed_update (ZeRO-Offload's delayed parameter update): the update of
// step t runs on the CPU while step t + 1's micro-batches compute, and its weights reach the
// model at the end of step t + 1; so step t + 1's gradients are taken at the weights of update
// t - 1 (one step stale; the math changes, on purpose). During the last backward each parameter's
// f32 gradient is copied (CUDA: on the copy stream, right after the event of its GradientsFinal)
// into one host buffer of every gradient (4 bytes per parameter, page-locked); Update() then
// finishes the previous update, hands its bf16 weights to the model (device weights on the
// upload stream after the step's compute; host weights of streamed layers by memcpy) and starts
// this one from the buffer without waiting for it, parameters in backward's order (the last
// first). A gradient copy into the buffer first waits until the update in flight is done with
// that parameter's gradients (normally long before: the next backward reaches it later). Anything
// that reads the state or the weights (GetMaster, StatePieces, Flush) first finishes the pending
// update.
//
// Ownership: the context must outlive it; it owns the optimizer, the state file (removed at
// destruction), the staging slabs and streams. Thread-safety: the run's thread; internally
// worker threads and CUDA stream callbacks.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/universal.h"
#include "core/status.h"
#include "core/stream.h"
#include "model/llama.h"
#include "offload/offloaded_optimizer.h"
#include "offload/staging_pool.h"
#include "offload/storage.h"
#include "ops/context.h"
#include "trainer/config.h"
#include "trainer/internal/train_state.h"

namespace tandem::trainer::internal {

class OffloadedAdamW : public model::HostMasters {
 public:
  // Over the trainable parameters of `params` (the model's, in parameters() order). Creates the
  // state file for "nvme"; InvalidArgument for a mode other than host/nvme.
  static StatusOr<std::unique_ptr<OffloadedAdamW>> Create(
      ops::Context& ctx, const std::vector<model::Parameter>& params,
      const OptimizerSection& options);
  ~OffloadedAdamW() override;
  OffloadedAdamW(const OffloadedAdamW&) = delete;
  OffloadedAdamW& operator=(const OffloadedAdamW&) = delete;

  // model::HostMasters: parameter `param`'s f32 master (host f32, its local shape); set also
  // zeroes its moments. Frozen parameters are ignored (Set) or an error (Get).
  Status SetMaster(size_t param, const Tensor& host_f32) override;
  Status GetMaster(size_t param, Tensor& host_f32) override;

  // One AdamW update of every trainable parameter of `params` (the list given to Create) from its
  // f32 gradient: `adamw` as given, but weight_decay only where Parameter::weight_decay.
  // After BeginLastBackward with `adamw`: finishes that step (InternalError if `adamw` differs).
  Status Update(const std::vector<model::Parameter>& params, const ops::AdamWParams& adamw);

  // [overlap] Logs (once) whether the update overlaps backward (`on`: grad_clip == 0) or runs
  // after it; the caller then passes BeginLastBackward an `adamw` exactly when `on`.
  void LogMode(bool on);
  // [overlap] Before the last micro-batch's ForwardBackward (gradients of earlier micro-batches
  // are not final). `adamw` non-null: starts the update step now (see the file comment);
  // nullptr: only gradient copies start early. `params` must stay valid until Update.
  Status BeginLastBackward(const std::vector<model::Parameter>& params,
                           const ops::AdamWParams* adamw);
  // [overlap] The model's GradReadyFn: the gradients of `ready` (parameters() indices) are final.
  // Does nothing outside BeginLastBackward .. Update (earlier micro-batches). Never waits for the
  // CPU update: chunks with no free staging slab are copied at a later call or in Update.
  Status GradientsFinal(const std::vector<size_t>& ready);
  // [overlap] Chunks whose update finished between BeginLastBackward and the start of the
  // following Update (0 without overlap), for tests and logs. Thread-safe.
  int64_t chunks_updated_in_backward() const { return early_updates_.load(); }

  // [universal] The state as StatePieces of `params` (whole parameters): views of the host
  // tier's memory, or fresh host copies for "nvme" (valid until the next Update).
  StatusOr<std::vector<StatePiece>> StatePieces(const std::vector<model::Parameter>& params);
  // [universal] Masters and moments of every trainable parameter from `reader`, and the model
  // weights from the masters. Errors name the tensor and the file.
  Status Restore(const checkpoint::UniversalReader& reader,
                 const std::vector<model::Parameter>& params);

  // [delayed] Finishes a pending delayed update and gives its weights to the model (before an
  // evaluation; saves and state reads do it themselves). Nothing without one.
  Status Flush();
  // [delayed] The model's WeightsNeededFn: the compute stream waits for these parameters' weight
  // uploads of the last update (each forward's first use), not for all of them at once.
  Status WeightsNeeded(const std::vector<size_t>& params);
  // [delayed] Before each update: with optimizer.delayed_update_after = N the first N updates
  // run undelayed (the delay starts once training has settled).
  void StartStep(int64_t step);

  // "host memory" or the state file's path; bytes of f32 state (master + 2 moments).
  std::string where() const;
  int64_t state_bytes() const { return 12 * numel_; }
  int64_t trainable_numel() const { return numel_; }

 private:
  // One chunk's trip through a staging slab (CUDA).
  struct Ticket {
    OffloadedAdamW* self = nullptr;
    int param = 0;  // optimizer index
    int64_t chunk = 0;
    offload::StagingPool::Slab slab;
    bool lent = false;  // holds `slab` (guarded by slab_mu_)
  };
  OffloadedAdamW(ops::Context& ctx, std::vector<int> index);
  Status InitCuda(int64_t chunk_elems, int threads);
  Status BeginOptimizerStep(const ops::AdamWParams& adamw);
  Status MarkFinal(int k);  // optimizer index k's gradient is final
  Status FinishCpu();
  Status FinishCuda();
  Status ArmCuda();                             // before the first gradient copy of a step
  Status IssueCopies(bool block);               // order_[issued_..] through free slabs
  Status HandOverNext();                        // order_[handed_]'s copy feeds the optimizer
  Status CopyWeightsToModel(int k, const model::Parameter& p);
  void UploadChunk(int k, int64_t chunk, int64_t first, const Bf16* w, int64_t n);
  void RecordError(const Status& st);
  // [delayed]
  Status InitDelayed();
  Status UpdateDelayed(const std::vector<model::Parameter>& params, const ops::AdamWParams& adamw);
  Status FinishPending(const ops::AdamWParams* next = nullptr,
                       const std::vector<model::Parameter>* next_params = nullptr);
  Status HandOverGradients();
  static void UploadsDone(void* self);                      // CUDA host callback: HandOverGradients
  Status CopyGradToHost(int k, const model::Parameter& p);  // CUDA: on d2h_, after grads_final_
  Status WaitGradsRead(int k);  // the pending update is done with parameter k's gradients
  StatusOr<offload::StagingPool::Slab> AcquireSlab();
  void ReleaseSlab(Ticket& t);
  void ReleaseAllSlabs();  // after a failed step, once the streams are idle
  Status TakeError();
  static void GradLanded(void* ticket);    // CUDA host callback
  static void UploadDone(void* ticket);    // CUDA host callback

  ops::Context& ctx_;
  std::vector<int> index_;          // parameter index -> optimizer index (-1: frozen)
  std::vector<size_t> param_of_;    // optimizer index -> parameter index
  int64_t numel_ = 0;
  std::string file_;                // "nvme": the state file
  std::unique_ptr<offload::Storage> storage_;
  std::unique_ptr<offload::OffloadedOptimizer> opt_;
  // CUDA only.
  std::unique_ptr<offload::StagingPool> pool_;
  std::optional<CudaStreamOwner> d2h_, upload_;
  std::optional<CudaEventOwner> grads_done_, uploads_done_;
  std::vector<std::vector<Ticket>> tickets_;  // [optimizer index][chunk]
  std::vector<char*> device_weights_;         // per optimizer index, during Update
  std::vector<uint8_t> host_weights_;         // per optimizer index: weights in host memory
  std::optional<CudaEventOwner> grads_final_;  // [overlap] recorded at each GradientsFinal
  // [overlap] The step of the last micro-batch: BeginLastBackward .. the end of Update.
  const std::vector<model::Parameter>* params_ = nullptr;  // non-null: armed
  bool step_begun_ = false;                    // opt_->BeginStep done
  std::optional<ops::AdamWParams> begun_with_;
  std::vector<uint8_t> final_;                 // per optimizer index: gradient final
  std::vector<std::pair<int, int64_t>> order_;  // CUDA: (k, chunk) in order of being final
  size_t issued_ = 0;                          // CUDA: order_[0, issued_) copies issued
  size_t handed_ = 0;                          // CUDA: order_[0, handed_) given to opt_
  std::atomic<bool> in_backward_{false};
  std::atomic<int64_t> early_updates_{0};
  bool mode_logged_ = false;
  // [delayed]
  bool delayed_ = false;
  int64_t delay_after_ = 0;
  bool delaying_ = false;                 // this step's update is delayed
  Tensor host_grads_;                     // f32 [numel_], every gradient, parameter after parameter
  std::vector<int64_t> grad_offset_;      // per optimizer index: its first element there
  std::vector<uint8_t> grad_copied_;      // per optimizer index: copy issued this step
  std::vector<HostRegistration> pinned_;  // host_grads_ and the optimizer's bf16 weights
  const std::vector<model::Parameter>* pending_ = nullptr;  // non-null: an update in flight
  std::unique_ptr<std::atomic<int64_t>[]> chunks_done_;     // per optimizer index, pending update
  std::vector<CudaEventOwner> uploaded_;  // CUDA, per optimizer index: its last upload is done
  std::vector<uint8_t> upload_pending_;   // ... and the compute stream has not waited for it
  std::mutex slab_mu_;
  std::mutex error_mu_;
  Status error_;
};

}  // namespace tandem::trainer::internal
