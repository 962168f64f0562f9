// EngineImpl: the Engine behind serve/engine.h (private to serve/).
//
// Threads: API calls (Submit, Cancel, LoadAdapter, ...) take `mu_` and touch only the intake
// queues, the adapter name map, the job map and the stats copy; the engine thread owns the
// waiting and running queues, the pool and InferModel, and runs Loop(): take new requests and
// cancels, run one Step, publish stats; the fine-tuning thread owns the active job, its trainer
// and the model's training state, and runs FineTuneLoop() (engine_finetune.cc) within the grant
// the engine thread posts each iteration (`ft_grant_`).
//
// One Step (serve/internal/engine_step.cc):
//   1. Running requests, oldest first, each get their next chunk (the rest of a prompt being
//      recomputed, or one decode token) within max_batch_tokens; a request that needs a new KV
//      block when the pool is full preempts the newest running request (its pages are freed and
//      it goes back to the front of the waiting queue, to be recomputed from its tokens).
//   2. Waiting requests are admitted in FIFO order while the budget, max_running and the pool
//      allow (admission never preempts); a request's adapter is made resident first (pool pages,
//      evicting unused adapters least-recently-used first). An adapter not in the host tier is
//      read from disk by the loader thread (serve/internal/adapter_loader.h): its request is
//      passed over until the read is in (it keeps its place; the ones behind it may go first).
//      The next few waiting requests' adapters are prefetched into the host tier the same way.
//   3. The batch (sorted by adapter so LoRA segments are contiguous) runs through InferModel
//      with the list of resident adapters (so its LoRA tables change only with residency); the
//      greedy ids come from the device, whole logits rows only for requests that sample with a
//      temperature or want logprobs; every request whose chunk reached the end of its tokens
//      emits one token: EOS, stop strings, max_tokens and the context limit end it and free its
//      pages.
//   4. The fine-tuning grant (engine_finetune.cc): an iteration that ran inference lets the
//      fine-tuning thread enqueue FineTuneOptions::busy_units of a micro-batch's forward/backward
//      units (LlamaModel::ContinueForwardBackward; all of them with busy_units = 0) until the
//      next iteration, and start a new micro-batch only when every waiting request was admitted
//      and the micro-batch fits in the budget left over minus one token (kept free for new
//      requests). When nothing runs or waits, the grant is unbounded. A Submit revokes the grant
//      until the next iteration has seen the request. The last micro-batch of a step runs AdamW.
//
// Streams: on a GPU, inference runs on `ctx_`, a high-priority stream, and the base model and
// fine-tuning on `train_ctx_`, a second context (stream, cuBLASLt workspace and allocator of its
// own) at normal priority. Inference reads the frozen base weights the model owns; nothing else
// is shared, so the two streams need no events between them, and neither allocator reuses memory
// the other stream may still use. The fine-tuning thread keeps at most two calls' units queued
// (Context::Pace), so what it enqueues runs beside the decode steps, in the SMs and memory
// bandwidth those leave, and neither thread waits for the other's kernels; it never waits for
// the whole device either (the engine thread may be capturing a CUDA graph): its host copies go
// through its own stream (CopyToHostOn). On a CPU the two contexts are plain CPU ones.
#pragma once

#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "model/llama.h"
#include "ops/context.h"
#include "serve/engine.h"
#include "serve/infer_model.h"
#include "serve/internal/adapter_loader.h"
#include "serve/internal/engine_state.h"
#include "serve/internal/finetune_job.h"
#include "serve/kv_pool.h"
#include "serve/sampling.h"

namespace tandem::serve::internal {

class EngineImpl final : public Engine {
 public:
  EngineImpl() = default;
  ~EngineImpl() override;

  Status Init(const EngineOptions& options);

  StatusOr<RequestId> Submit(GenerationRequest request, EventCallback on_event) override;
  void Cancel(RequestId id) override;
  std::vector<ModelInfo> Models() const override;
  Status LoadAdapter(const std::string& name, const std::string& path) override;
  Status UnloadAdapter(const std::string& name) override;
  EngineStats Stats() const override;
  const model::Tokenizer& tokenizer() const override { return *tokenizer_; }
  const std::string& base_model_name() const override { return base_name_; }
  int64_t max_model_len() const override { return max_model_len_; }
  void Shutdown() override;

  StatusOr<FineTuneJobInfo> CreateFineTuneJob(FineTuneJobSpec spec) override;
  std::vector<FineTuneJobInfo> ListFineTuneJobs() const override;
  StatusOr<FineTuneJobInfo> GetFineTuneJob(const std::string& id) const override;
  StatusOr<FineTuneJobInfo> CancelFineTuneJob(const std::string& id) override;

 private:
  struct Scheduled {
    RequestState* req;
    int64_t chunk;
  };

  StatusOr<std::shared_ptr<AdapterEntry>> FindAdapterLocked(const std::string& model);
  Status AlreadyExists(const std::string& name) const;
  // Reads entry's adapter from disk (any thread: reads only the name, path and the model config).
  StatusOr<HostAdapter> ReadHostAdapter(const AdapterEntry& entry) const;
  void InstallHostCopy(AdapterEntry& entry, HostAdapter host) const;
  Status LoadHostCopy(AdapterEntry& entry) const;  // Read + Install, blocking
  // Checks entry.path against the base model without reading the weights; sets entry.config and
  // entry.weight_bytes (the host copy is read on first use).
  Status CheckOnDisk(AdapterEntry& entry) const;
  // A load or check failure of `entry`'s directory, naming the adapter and path.
  Status AdapterError(const AdapterEntry& entry, const Status& s) const;

  // Engine thread.
  void Loop();
  Status Step();
  void CancelNow(RequestId id);
  void FailAll(const Status& error);
  // Blocks so the request's cache covers `positions`; false when the pool is short.
  bool GrowBlocks(RequestState& r, int64_t positions);
  void FreeBlocks(RequestState& r);
  // Preempts the newest running request; returns it (nullptr when none is running).
  RequestState* PreemptNewest();
  // Makes r's adapter resident (pool pages, device copy); false when the pool is short.
  StatusOr<bool> MakeResident(const std::shared_ptr<AdapterEntry>& entry);
  void ReleaseAdapter(AdapterEntry& a);
  // Frees the pages of the least recently used resident adapter that no running request uses
  // (other than `keep`); false when there is none.
  bool EvictUnusedAdapter(const AdapterEntry* keep);
  // Frees the pool pages of unloaded adapters no running request uses.
  void DropUnloadedAdapters();
  // Asks the loader for the host copies of the next waiting requests' adapters.
  void Prefetch();
  // Installs the loader's finished reads; a failed read finishes the waiting requests of that
  // adapter with the error.
  void CollectLoads();
  // Step 2: admits waiting requests (FIFO; a request whose adapter is still being read is passed
  // over, the others are not). Returns the budget left.
  int64_t Admit(std::vector<Scheduled>& batch, int64_t budget);
  // Drops host copies of adapters beyond options_.host_adapter_cache (least recently used first,
  // never one that is resident or in use).
  void TrimHostCache();
  // Emits r's next token: `greedy` (chosen on the device) when `logits` is null, else sampled
  // from the f32 row `logits` [vocab] (temperature, logprobs: see NeedsFullRow); true when r
  // finished.
  StatusOr<bool> Emit(RequestState& r, int32_t greedy, const float* logits, int64_t vocab);
  // Whether r's next token needs its whole logits row on the host.
  static bool NeedsFullRow(const RequestState& r);
  // Part 3 of Step: the batched forward, sampling and events.
  Status RunBatch(std::vector<Scheduled>& batch);

  // Fine-tuning (engine_finetune.cc).
  Status ValidateFineTuneSpec(const FineTuneJobSpec& spec) const;
  // FailedPrecondition when `adapter` is loaded as a plain adapter or an unfinished job trains it.
  Status CheckAdapterFreeLocked(const std::string& adapter) const;
  // Init: reads the jobs under finetune.state_dir, queues unfinished ones, reloads published
  // versions.
  Status ResumeFineTuneJobs();
  // Engine thread: step 4 above.
  void GrantFineTune(int64_t leftover, bool all_admitted, bool idle);
  // With mu_ held: fine-tuning enqueues nothing more until the next grant (requests first).
  void RevokeFineTuneGrantLocked();
  // Fine-tuning thread: runs the active job (or starts the next queued one) within the grant.
  void FineTuneLoop();
  // One piece of the active job: a unit, a micro-batch's end, or a wait for the next grant.
  // Failures end the job, never the inference requests.
  void RunFineTune();
  Status StartNextJob();
  Status PublishVersion(FineTuneJobEntry& job);
  void SnapshotJob(FineTuneJobEntry& job, const std::string& status, const std::string& error);
  void EndJob(const std::string& status, const std::string& error);
  void SyncJobInfo(FineTuneJobEntry& job);
  std::string JobDir(const std::string& id) const;

  // Sends the final event and releases r's pages and adapter.
  void Finish(RequestState& r, const std::string& reason, const std::string& error);

  EngineOptions options_;
  std::unique_ptr<ops::Context> ctx_;         // inference (high priority on a GPU)
  std::unique_ptr<ops::Context> train_ctx_;   // the model and fine-tuning
  std::unique_ptr<model::LlamaModel> model_;  // on train_ctx_
  std::unique_ptr<model::Tokenizer> tokenizer_;
  std::unique_ptr<InferModel> infer_;
  std::string base_name_;
  int64_t max_model_len_ = 0;
  std::set<int32_t> eos_ids_;
  PagePool pool_;
  Tensor kv_pages_;  // the pool as [P, page_elems] in the compute dtype
  uint64_t iteration_ = 0;
  std::vector<std::shared_ptr<AdapterEntry>> resident_;  // adapters holding pool pages

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  RequestId next_id_ = 1;
  std::vector<std::unique_ptr<RequestState>> incoming_;            // guarded by mu_
  std::vector<RequestId> cancels_;                                 // guarded by mu_
  std::map<std::string, std::shared_ptr<AdapterEntry>> adapters_;  // guarded by mu_
  EngineStats stats_;                                              // guarded by mu_
  int64_t waiting_count_ = 0;                                      // guarded by mu_
  std::map<std::string, std::shared_ptr<FineTuneJobEntry>> jobs_;  // guarded by mu_
  std::deque<std::shared_ptr<FineTuneJobEntry>> ft_queue_;         // guarded by mu_
  bool ft_running_ = false;                                        // guarded by mu_
  int64_t next_job_ = 1;                                           // guarded by mu_
  // What the fine-tuning thread may do until the engine thread's next iteration.
  struct FineTuneGrant {
    uint64_t seq = 0;              // bumped by every new grant
    int64_t units = INT64_MAX;     // forward/backward units it may still enqueue
    int64_t leftover = INT64_MAX;  // tokens the iteration left over
    bool all_admitted = true;
    bool idle = true;  // nothing runs or waits: any micro-batch may start
  };
  FineTuneGrant ft_grant_;                       // guarded by mu_
  std::condition_variable ft_cv_;                // with mu_: grants, jobs, cancels, stop
  std::shared_ptr<FineTuneJobEntry> ft_active_;  // fine-tuning thread: the job being trained

  std::deque<std::unique_ptr<RequestState>> waiting_;   // engine thread
  std::vector<std::unique_ptr<RequestState>> running_;  // engine thread, admission order
  bool waiting_on_loads_ = false;  // engine thread: the last step had only reads to wait for
  bool load_finished_ = false;     // guarded by mu_: a read finished since the last wake-up
  std::thread thread_;
  std::thread ft_thread_;
  // Last: destroyed first (its thread uses the model and mu_/cv_).
  std::unique_ptr<AdapterLoader> loader_;
};

}  // namespace tandem::serve::internal
