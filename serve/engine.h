// Engine: the serving core behind `tandem serve`. It owns one base model, its tokenizer, the
// adapters it can serve and the paged memory pool, and runs a loop on its own thread that
// batches every running request at each iteration (continuous batching).
//
//   TANDEM_ASSIGN_OR_RETURN(auto engine, Engine::Create(options));
//   GenerationRequest req{.model = "my-adapter", .prompt_tokens = ids, .sampling = {...}};
//   TANDEM_ASSIGN_OR_RETURN(RequestId id, engine->Submit(std::move(req), [](const TokenEvent& e) {
//     // called on the engine thread, once per generated token, then once with finished == true
//   }));
//   engine->Cancel(id);   // e.g. the client went away: its pages are freed at the next iteration
//
// Ownership: the Engine owns the model, pool and adapters. Callbacks must not block (hand the
// event to another thread) and must not call back into the Engine.
// Thread-safety: every public method may be called from any thread.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/status.h"
#include "model/tokenizer.h"
#include "serve/finetune.h"

namespace tandem::serve {

struct SamplingParams {
  float temperature = 1.0f;  // 0: greedy
  int top_k = 0;             // 0: off
  float top_p = 1.0f;        // 1: off
  bool has_seed = false;
  uint64_t seed = 0;
  int max_tokens = 16;
  std::vector<std::string> stop;  // generation ends before the first occurrence of any
  int logprobs = -1;              // -1: none; n >= 0: the chosen token's and the top n others'
  bool ignore_eos = false;
};

struct GenerationRequest {
  // The base model's name or an adapter's name (optionally "name@version").
  std::string model;
  std::vector<int32_t> prompt_tokens;
  SamplingParams sampling;
};

using RequestId = uint64_t;

struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0;
};

struct TokenEvent {
  RequestId id = 0;
  // The new token (absent when finished without one: stop string, cancel or error).
  bool has_token = false;
  int32_t token = 0;
  // Text this event adds to the completion (UTF-8 that is complete so far; stop strings removed).
  std::string text;
  float logprob = 0;
  std::vector<TokenLogprob> top_logprobs;
  bool finished = false;
  // When finished: "stop" (EOS or stop string), "length" (max_tokens or context), "cancelled",
  // "error" (then `error` says why).
  std::string finish_reason;
  std::string error;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
};

using EventCallback = std::function<void(const TokenEvent&)>;

struct ModelInfo {
  std::string id;      // name used in requests
  std::string parent;  // the base model's name for adapters, empty for the base
  std::string path;    // where it was loaded from
};

struct EngineStats {
  int64_t waiting = 0;           // requests queued, not yet admitted
  int64_t running = 0;           // requests in the running batch
  int64_t pool_pages_total = 0;  // pages in the unified pool
  int64_t pool_pages_kv = 0;     // pages holding KV-cache blocks
  int64_t pool_pages_adapter = 0;
  int64_t adapter_loads = 0;     // adapter loads into the pool since start
  int64_t lora_table_builds = 0;  // LoRA weight tables built over the resident adapters
  int64_t decode_graph_captures = 0;  // decode shapes captured as CUDA graphs (infer_model.h)
  int64_t decode_graph_replays = 0;   // decode steps run as a CUDA graph replay
  int64_t preemptions = 0;
  int64_t generated_tokens = 0;
  int64_t prompt_tokens = 0;
  int64_t iterations = 0;        // engine iterations that ran a batch
  double batch_seconds = 0;      // wall time of those iterations (schedule, forward, sampling)
  // Co-serving fine-tuning (serve/finetune.h).
  int64_t finetune_tokens = 0;    // tokens through forward+backward since start
  int64_t finetune_steps = 0;     // optimizer steps since start
  int64_t finetune_jobs_running = 0;
  double finetune_loss = 0;       // the running job's last step loss (0: none yet)
};

struct EngineOptions {
  std::string model_dir;         // HF directory: config.json, safetensors, tokenizer.json
  std::string model_name;        // name of the base model in requests ("" -> directory name)
  std::string device = "auto";   // "cpu", "cuda", "cuda:N" or "auto"
  int64_t pool_bytes = 0;        // unified pool size; 0: a default fraction of free memory
  int64_t page_bytes = 64 << 10; // page size of the unified pool
  int64_t max_batch_tokens = 2048;  // token budget per iteration (prefill chunks + decodes)
  int64_t max_running = 256;     // requests in the running batch at most
  int64_t max_waiting = 1024;    // Submit fails with Unavailable beyond this
  int64_t max_model_len = 0;     // prompt + completion tokens; 0: the model's max positions
  int64_t host_adapter_cache = 64;  // adapters kept in the host LRU (f32 copies)
  bool cuda_graphs = true;  // replay decode batches of a seen shape as CUDA graphs (infer_model.h)
  // Adapters loaded at start: (name, directory): a PEFT LoRA directory or an S2FT adapter
  // (tandem-s2ft format, peft/s2ft_io.h; served in LoRA form, peft::S2ftAsLora).
  std::vector<std::pair<std::string, std::string>> adapters;
  // Fine-tuning jobs run in the leftover token budget (serve/finetune.h). Unfinished jobs under
  // finetune.state_dir are resumed by Create.
  FineTuneOptions finetune;
};

class Engine {
 public:
  virtual ~Engine() = default;

  static StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options);

  // Queues a request. Errors: NotFound (unknown model/adapter), InvalidArgument (empty prompt,
  // prompt + max_tokens beyond max_model_len, bad sampling values), Unavailable (queue full).
  virtual StatusOr<RequestId> Submit(GenerationRequest request, EventCallback on_event) = 0;
  // Ends a request; its callback gets one last event with finish_reason "cancelled" (unless it
  // already finished). Unknown ids are ignored.
  virtual void Cancel(RequestId id) = 0;

  virtual std::vector<ModelInfo> Models() const = 0;
  // Loads a PEFT LoRA adapter directory under `name`. FailedPrecondition ("already exists") if
  // the name is taken, InvalidArgument for an adapter that does not fit the base model.
  virtual Status LoadAdapter(const std::string& name, const std::string& path) = 0;
  // NotFound if unknown; requests already running with it finish first.
  virtual Status UnloadAdapter(const std::string& name) = 0;

  virtual EngineStats Stats() const = 0;

  // Fine-tuning jobs (serve/finetune.h). The defaults answer Unimplemented (engines without
  // fine-tuning). Create: InvalidArgument for a bad spec, FailedPrecondition when fine-tuning is
  // not configured or the adapter name is taken; Get/Cancel: NotFound for an unknown id. Cancel
  // of a finished job returns it unchanged.
  virtual StatusOr<FineTuneJobInfo> CreateFineTuneJob(FineTuneJobSpec spec);
  virtual std::vector<FineTuneJobInfo> ListFineTuneJobs() const { return {}; }
  virtual StatusOr<FineTuneJobInfo> GetFineTuneJob(const std::string& id) const;
  virtual StatusOr<FineTuneJobInfo> CancelFineTuneJob(const std::string& id);
  virtual const model::Tokenizer& tokenizer() const = 0;
  virtual const std::string& base_model_name() const = 0;
  virtual int64_t max_model_len() const = 0;

  // Stops the loop: running and waiting requests finish with "cancelled". Idempotent; the
  // destructor calls it.
  virtual void Shutdown() = 0;
};

}  // namespace tandem::serve
