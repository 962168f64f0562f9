// The serving engine (serve/engine.h): request intake, the adapter registry and the engine thread.
// The iteration itself (scheduling, the batched forward, sampling, events) is in
// serve/engine_step.cc; both share serve/internal/engine_impl.h.
#include <algorithm>
#include <cstdint>
#include <filesystem>

#include "core/logging.h"
#include "model/config.h"
#include "peft/adapter_io.h"
#include "peft/lora.h"
#include "peft/s2ft.h"
#include "peft/s2ft_io.h"
#include "serve/internal/engine_impl.h"

#ifdef TANDEM_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace tandem::serve {
namespace internal {

namespace fs = std::filesystem;

namespace {

int64_t DefaultPoolBytes(const Device& device) {
#ifdef TANDEM_WITH_CUDA
  if (device.is_cuda()) {
    size_t free_bytes = 0, total = 0;
    if (cudaSetDevice(device.index) == cudaSuccess &&
        cudaMemGetInfo(&free_bytes, &total) == cudaSuccess) {
      return static_cast<int64_t>(free_bytes) / 2;  // half of what is free after the weights
    }
  }
#endif
  (void)device;
  return int64_t{256} << 20;
}

}  // namespace

EngineImpl::~EngineImpl() { Shutdown(); }

Status EngineImpl::Init(const EngineOptions& options) {
  options_ = options;
  if (options.max_batch_tokens <= 0 || options.max_running <= 0 || options.max_waiting <= 0) {
    return InvalidArgumentError(StrCat(
        "EngineOptions: max_batch_tokens, max_running and ", "max_waiting must be positive, found ",
        options.max_batch_tokens, ", ", options.max_running, ", ", options.max_waiting));
  }
  Device device = Device::Cpu();
  if (options.device == "auto") {
    if (CudaAvailable()) device = Device::Cuda(0);
  } else {
    TANDEM_ASSIGN_OR_RETURN(device, ParseDevice(options.device));
  }
  TANDEM_ASSIGN_OR_RETURN(ctx_, ops::Context::ForDevice(device, ops::StreamPriority::kHigh));
  TANDEM_ASSIGN_OR_RETURN(train_ctx_, ops::Context::ForDevice(device));
  if (options.finetune.busy_sms < 0) {
    return InvalidArgumentError(
        StrCat("EngineOptions: finetune.busy_sms must be >= 0, found ", options.finetune.busy_sms));
  }
  if (options.finetune.busy_sms > 0 && train_ctx_->is_cuda()) {
    StatusOr<int> sms = train_ctx_->CreateSmPartition(
        static_cast<int>(std::min<int64_t>(options.finetune.busy_sms, INT32_MAX)));
    if (!sms.ok()) return sms.status().WithContext("EngineOptions: finetune.busy_sms");
    TANDEM_LOG(INFO, "serve") << "fine-tuning runs on " << *sms
                              << " SMs set apart while requests are served";
  } else if (options.finetune.busy_sms > 0) {
    TANDEM_LOG(WARNING, "serve") << "finetune.busy_sms " << options.finetune.busy_sms
                                 << " ignored on " << device.ToString() << " (no SMs to set apart)";
  }
  TANDEM_ASSIGN_OR_RETURN(model::LlamaConfig config,
                          model::LoadLlamaConfig(options.model_dir + "/config.json"));
  model::ModelOptions mo;
  mo.trainable = false;
  TANDEM_ASSIGN_OR_RETURN(model_, model::LlamaModel::Create(*train_ctx_, config, mo));
  TANDEM_RETURN_IF_ERROR(model_->LoadSafetensors(options.model_dir));
  const std::string tok_path = options.model_dir + "/tokenizer.json";
  if (fs::exists(tok_path)) {
    TANDEM_ASSIGN_OR_RETURN(tokenizer_, model::LoadTokenizer(tok_path));
  } else {
    tokenizer_ = model::MakeByteTokenizer();
  }
  base_name_ = options.model_name;
  if (base_name_.empty()) base_name_ = fs::path(options.model_dir).lexically_normal().filename();
  if (base_name_.empty()) base_name_ = fs::path(options.model_dir).parent_path().filename();
  max_model_len_ =
      options.max_model_len > 0 ? options.max_model_len : model_->config().max_position_embeddings;
  for (int32_t id : model_->config().eos_token_ids) eos_ids_.insert(id);
  if (model_->config().eos_token_id) eos_ids_.insert(*model_->config().eos_token_id);
  if (tokenizer_->eos_id()) eos_ids_.insert(*tokenizer_->eos_id());

  // KV blocks: as many positions per page as fit (a power of two, at most 256).
  const model::LlamaConfig& c = model_->config();
  const int64_t per_pos = 2 * c.num_key_value_heads * c.head_dim *
                          static_cast<int64_t>(DTypeSize(model_->compute_dtype()));
  int64_t block_tokens = 1;
  while (block_tokens * 2 * per_pos <= options.page_bytes && block_tokens < 256) block_tokens *= 2;
  if (block_tokens * per_pos > options.page_bytes) {
    return InvalidArgumentError(StrCat("page_bytes ", options.page_bytes, " cannot hold one ",
                                       "position of K and V (", per_pos, " bytes)"));
  }
  TANDEM_ASSIGN_OR_RETURN(infer_, InferModel::Create(*ctx_, *model_, block_tokens));
  infer_->set_cuda_graphs(options.cuda_graphs);
  const int64_t pool_bytes = options.pool_bytes > 0 ? options.pool_bytes : DefaultPoolBytes(device);
  TANDEM_ASSIGN_OR_RETURN(pool_, PagePool::Create(ctx_->allocator(), options.page_bytes,
                                                  pool_bytes / options.page_bytes));
  kv_pages_ = pool_.PagesAs(model_->compute_dtype());
  stats_.pool_pages_total = pool_.num_pages();
  for (const auto& [name, path] : options.adapters) TANDEM_RETURN_IF_ERROR(LoadAdapter(name, path));
  TANDEM_RETURN_IF_ERROR(ResumeFineTuneJobs());
  loader_ = std::make_unique<AdapterLoader>(
      [this](const AdapterEntry& e) { return ReadHostAdapter(e); },
      [this] {
        std::lock_guard<std::mutex> lock(mu_);
        load_finished_ = true;
        cv_.notify_all();
      });
  thread_ = std::thread([this] { Loop(); });
  ft_thread_ = std::thread([this] { FineTuneLoop(); });
  return Status::Ok();
}

// ---- Requests ----

StatusOr<RequestId> EngineImpl::Submit(GenerationRequest request, EventCallback on_event) {
  const SamplingParams& s = request.sampling;
  if (request.prompt_tokens.empty())
    return InvalidArgumentError("prompt: expected tokens, found none");
  for (int32_t t : request.prompt_tokens) {
    if (t < 0 || t >= model_->config().vocab_size) {
      return InvalidArgumentError(StrCat("prompt: token id ", t, " outside the vocabulary [0, ",
                                         model_->config().vocab_size, ")"));
    }
  }
  if (s.max_tokens < 1) {
    return InvalidArgumentError(StrCat("max_tokens: expected >= 1, found ", s.max_tokens));
  }
  const int64_t total = static_cast<int64_t>(request.prompt_tokens.size()) + s.max_tokens;
  if (total > max_model_len_) {
    return InvalidArgumentError(StrCat("prompt (", request.prompt_tokens.size(),
                                       " tokens) + max_tokens (", s.max_tokens, ") exceeds ",
                                       "the maximum context length ", max_model_len_));
  }
  TANDEM_RETURN_IF_ERROR(ValidateSamplingParams(
      SamplerParams{.temperature = s.temperature, .top_k = s.top_k, .top_p = s.top_p}));
  if (s.logprobs > 20) {
    return InvalidArgumentError(StrCat("logprobs: expected at most 20, found ", s.logprobs));
  }
  auto req = std::make_unique<RequestState>();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return UnavailableError("the engine is shutting down");
    if (request.model != base_name_ && !request.model.empty()) {
      TANDEM_ASSIGN_OR_RETURN(req->adapter, FindAdapterLocked(request.model));
    }
    if (static_cast<int64_t>(incoming_.size()) + waiting_count_ >= options_.max_waiting) {
      return UnavailableError(
          StrCat("the waiting queue is full (", options_.max_waiting, " requests)"));
    }
    req->id = next_id_++;
    const uint64_t seed = s.has_seed ? s.seed : DeriveSeed(req->id, 0, "unseeded");
    req->rng = Rng(DeriveSeed(seed, 0, "sampling"));
    req->tokens = request.prompt_tokens;
    req->num_prompt = static_cast<int64_t>(request.prompt_tokens.size());
    req->text = std::make_unique<TextStream>(tokenizer_.get(), s.stop);
    req->gen = std::move(request);
    req->on_event = std::move(on_event);
    const RequestId id = req->id;
    incoming_.push_back(std::move(req));
    RevokeFineTuneGrantLocked();  // until Step has seen the request
    cv_.notify_all();
    return id;
  }
}

void EngineImpl::Cancel(RequestId id) {
  std::lock_guard<std::mutex> lock(mu_);
  cancels_.push_back(id);
  cv_.notify_all();
}

// ---- Adapters ----

StatusOr<std::shared_ptr<AdapterEntry>> EngineImpl::FindAdapterLocked(const std::string& model) {
  auto it = adapters_.find(model);
  if (it != adapters_.end()) return it->second;
  // "name" without a version: the newest "name@version" (versions compare as numbers when both
  // are numbers, else as strings).
  if (model.find('@') == std::string::npos) {
    std::shared_ptr<AdapterEntry> best;
    std::string best_version;
    auto newer = [](const std::string& a, const std::string& b) {
      const bool na = !a.empty() && a.find_first_not_of("0123456789") == std::string::npos;
      const bool nb = !b.empty() && b.find_first_not_of("0123456789") == std::string::npos;
      if (na && nb && a.size() != b.size()) return a.size() > b.size();
      return a > b;
    };
    for (const auto& [name, entry] : adapters_) {
      if (name.rfind(model + "@", 0) != 0) continue;
      const std::string version = name.substr(model.size() + 1);
      if (!best || newer(version, best_version)) {
        best = entry;
        best_version = version;
      }
    }
    if (best) return best;
  }
  return NotFoundError(StrCat("model '", model, "' is neither the base model '", base_name_,
                              "' nor a loaded adapter"));
}

Status EngineImpl::LoadAdapter(const std::string& name, const std::string& path) {
  if (name.empty() || name == base_name_) {
    return InvalidArgumentError(StrCat("adapter name '", name, "' is empty or the base model's"));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (adapters_.count(name)) return AlreadyExists(name);
  }
  auto entry = std::make_shared<AdapterEntry>();
  entry->name = name;
  entry->path = path;
  bool host_full = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    host_full = static_cast<int64_t>(adapters_.size()) >= options_.host_adapter_cache;
  }
  if (host_full && !peft::IsS2ftAdapterDir(path)) {
    // The host tier is full: check the directory against the base model (config and tensor
    // headers) and leave the weights on disk until a request uses the adapter.
    TANDEM_RETURN_IF_ERROR(CheckOnDisk(*entry));
  } else {
    TANDEM_RETURN_IF_ERROR(LoadHostCopy(*entry));  // validates against the base model
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (adapters_.count(name)) return AlreadyExists(name);
  if (static_cast<int64_t>(adapters_.size()) >= options_.host_adapter_cache) {
    entry->host.reset();  // the host tier is full: this one waits on disk until it is used
    entry->host_ctx.reset();
  }
  adapters_[name] = std::move(entry);
  return Status::Ok();
}

Status EngineImpl::AlreadyExists(const std::string& name) const {
  return Status(StatusCode::kFailedPrecondition,
                StrCat("adapter '", name, "' is already loaded (AlreadyExists)"));
}

namespace {

// An S2FT adapter directory (peft/s2ft_io.h) in LoRA form (peft::S2ftAsLora): it is then served
// like any LoRA adapter, through the same tiers and kernels.
StatusOr<std::unique_ptr<peft::LoraAdapter>> ReadS2ftAsLora(ops::Context& ctx,
                                                            const model::LlamaConfig& base,
                                                            const std::string& dir) {
  TANDEM_ASSIGN_OR_RETURN(std::unique_ptr<peft::S2ftAdapter> s2ft,
                          peft::LoadS2ftAdapter(ctx, base, dir));
  return peft::S2ftAsLora(ctx, *s2ft);
}

}  // namespace

Status EngineImpl::AdapterError(const AdapterEntry& entry, const Status& s) const {
  if (s.code() == StatusCode::kNotFound || s.code() == StatusCode::kInvalidArgument ||
      s.code() == StatusCode::kUnimplemented) {
    return s.WithContext(StrCat("adapter '", entry.name, "' from ", entry.path));
  }
  return InvalidArgumentError(
      StrCat("adapter '", entry.name, "' from ", entry.path, ": ", s.ToString()));
}

StatusOr<HostAdapter> EngineImpl::ReadHostAdapter(const AdapterEntry& entry) const {
  HostAdapter out;
  out.ctx = ops::Context::Cpu();
  StatusOr<std::unique_ptr<peft::LoraAdapter>> host =
      peft::IsS2ftAdapterDir(entry.path)
          ? ReadS2ftAsLora(*out.ctx, model_->config(), entry.path)
          : peft::LoadLoraAdapter(*out.ctx, model_->config(), entry.path);
  if (!host.ok()) return AdapterError(entry, host.status());
  out.lora = std::move(*host);
  return out;
}

void EngineImpl::InstallHostCopy(AdapterEntry& entry, HostAdapter host) const {
  entry.host_ctx = std::move(host.ctx);
  entry.host = std::move(host.lora);
  entry.config = entry.host->config();
  // What AdapterWeights puts on the device: the fused q/k/v and gate/up sites' block-diagonal B
  // included (their zero blocks take memory too).
  entry.weight_bytes = AdapterWeights::BytesFor(*entry.host, model_->compute_dtype());
}

Status EngineImpl::CheckOnDisk(AdapterEntry& entry) const {
  StatusOr<peft::LoraAdapterInfo> info = peft::CheckLoraAdapterDir(model_->config(), entry.path);
  if (!info.ok()) return AdapterError(entry, info.status());
  entry.config = info->config;
  entry.weight_bytes =
      AdapterWeights::BytesFor(model_->config(), info->targets, model_->compute_dtype());
  return Status::Ok();
}

Status EngineImpl::LoadHostCopy(AdapterEntry& entry) const {
  TANDEM_ASSIGN_OR_RETURN(HostAdapter host, ReadHostAdapter(entry));
  InstallHostCopy(entry, std::move(host));
  return Status::Ok();
}

Status EngineImpl::UnloadAdapter(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = adapters_.find(name);
  if (it == adapters_.end()) return NotFoundError(StrCat("adapter '", name, "' is not loaded"));
  it->second->unloaded = true;  // the engine thread frees its pages once no request uses it
  adapters_.erase(it);
  return Status::Ok();
}

std::vector<ModelInfo> EngineImpl::Models() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<ModelInfo> out{{base_name_, "", options_.model_dir}};
  for (const auto& [name, entry] : adapters_) out.push_back({name, base_name_, entry->path});
  return out;
}

EngineStats EngineImpl::Stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  EngineStats s = stats_;
  s.waiting = waiting_count_ + static_cast<int64_t>(incoming_.size());
  return s;
}

// ---- The engine thread ----

void EngineImpl::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ && !thread_.joinable()) return;
    stopping_ = true;
    cv_.notify_all();
    ft_cv_.notify_all();
  }
  if (thread_.joinable()) thread_.join();
  if (ft_thread_.joinable()) ft_thread_.join();
}

void EngineImpl::Loop() {
#ifdef TANDEM_WITH_CUDA
  if (ctx_->is_cuda())
    (void)cudaSetDevice(ctx_->device().index);  // the current device is per thread
#endif
  while (true) {
    std::vector<RequestId> cancels;
    {
      std::unique_lock<std::mutex> lock(mu_);
      // Waiting requests that only wait for adapter reads sleep until a read finishes.
      cv_.wait(lock, [&] {
        return stopping_ || !incoming_.empty() || !cancels_.empty() || !running_.empty() ||
               (!waiting_.empty() && (!waiting_on_loads_ || load_finished_));
      });
      load_finished_ = false;
      if (stopping_) break;
      for (auto& r : incoming_) waiting_.push_back(std::move(r));
      incoming_.clear();
      cancels.swap(cancels_);
      waiting_count_ = static_cast<int64_t>(waiting_.size());
    }
    for (RequestId id : cancels) CancelNow(id);
    Status s = Step();
    if (!s.ok()) FailAll(s);
    std::lock_guard<std::mutex> lock(mu_);
    waiting_count_ = static_cast<int64_t>(waiting_.size());
    stats_.running = static_cast<int64_t>(running_.size());
    stats_.pool_pages_kv = pool_.used_pages(PageUse::kKv);
    stats_.pool_pages_adapter = pool_.used_pages(PageUse::kAdapter);
  }
  // Shutdown: everything still queued or running ends "cancelled".
  std::vector<std::unique_ptr<RequestState>> rest;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& r : incoming_) rest.push_back(std::move(r));
    incoming_.clear();
  }
  for (auto& r : waiting_) rest.push_back(std::move(r));
  for (auto& r : running_) rest.push_back(std::move(r));
  waiting_.clear();
  running_.clear();
  for (auto& r : rest) Finish(*r, "cancelled", "");
}

}  // namespace internal

StatusOr<FineTuneJobInfo> Engine::CreateFineTuneJob(FineTuneJobSpec) {
  return UnimplementedError("this engine does not run fine-tuning jobs");
}

StatusOr<FineTuneJobInfo> Engine::GetFineTuneJob(const std::string& id) const {
  return NotFoundError(StrCat("no fine-tuning job '", id, "'"));
}

StatusOr<FineTuneJobInfo> Engine::CancelFineTuneJob(const std::string& id) {
  return NotFoundError(StrCat("no fine-tuning job '", id, "'"));
}

StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options) {
  auto engine = std::make_unique<internal::EngineImpl>();
  TANDEM_RETURN_IF_ERROR(engine->Init(options));
  return std::unique_ptr<Engine>(std::move(engine));
}

}  // namespace tandem::serve
