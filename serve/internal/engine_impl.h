// EngineImpl: the Engine behind serve/engine.h (private to serve/).
//
// Threads: API calls (Submit, Cancel, LoadAdapter, ...) take `mu_` and touch only the intake
// queues, the adapter name map and the stats copy; the engine thread owns everything else (the
// waiting and running queues, the pool, the model) and runs Loop(): take new requests and
// cancels, run one Step, publish stats.
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
//   4. Fine-tuning (serve/internal/engine_finetune.cc): when every waiting request was admitted
//      and the next micro-batch of the active job fits in the budget left over minus one token
//      (kept free for new requests), or nothing else ran, one micro-batch runs forward+backward
//      with the job's adapter attached to the model; the last micro-batch of a step runs AdamW.
//      So a decode step waits at most one micro-batch for fine-tuning.
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
  // Step 4 above. Failures end the job, never the inference requests.
  void RunFineTune(int64_t leftover, bool all_admitted, bool idle);
  Status StartNextJob();
  Status PublishVersion(FineTuneJobEntry& job);
  void SnapshotJob(FineTuneJobEntry& job, const std::string& status, const std::string& error);
  void EndJob(const std::string& status, const std::string& error);
  void SyncJobInfo(FineTuneJobEntry& job);
  std::string JobDir(const std::string& id) const;

  // Sends the final event and releases r's pages and adapter.
  void Finish(RequestState& r, const std::string& reason, const std::string& error);

  EngineOptions options_;
  std::unique_ptr<ops::Context> ctx_;
  std::unique_ptr<model::LlamaModel> model_;
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
  std::shared_ptr<FineTuneJobEntry> ft_active_;  // engine thread: the job being trained

  std::deque<std::unique_ptr<RequestState>> waiting_;   // engine thread
  std::vector<std::unique_ptr<RequestState>> running_;  // engine thread, admission order
  bool waiting_on_loads_ = false;  // engine thread: the last step had only reads to wait for
  bool load_finished_ = false;     // guarded by mu_: a read finished since the last wake-up
  std::thread thread_;
  // Last: destroyed first (its thread uses the model and mu_/cv_).
  std::unique_ptr<AdapterLoader> loader_;
};

}  // namespace tandem::serve::internal
