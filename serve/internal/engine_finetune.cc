// Co-serving fine-tuning in the engine: the job API, the leftover-budget step, publication of
// adapter versions and crash-recovery snapshots (serve/finetune.h, serve/internal/engine_impl.h).
#include <algorithm>
#include <cmath>
#include <ctime>
#include <filesystem>

#include "core/logging.h"
#include "peft/adapter_io.h"
#include "serve/internal/engine_impl.h"

#ifdef TANDEM_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace tandem::serve::internal {

namespace fs = std::filesystem;

namespace {

bool Finished(const std::string& status) {
  return status == "succeeded" || status == "failed" || status == "cancelled";
}

bool ValidAdapterName(const std::string& name) {
  if (name.empty() || name.size() > 64 || name[0] == '.') return false;
  for (char c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') {
      return false;
    }
  }
  return true;
}

// The version number of "<name>@<digits>", or -1.
int64_t VersionOf(const std::string& model, const std::string& name) {
  if (model.rfind(name + "@", 0) != 0) return -1;
  const std::string v = model.substr(name.size() + 1);
  if (v.empty() || v.size() > 9 || v.find_first_not_of("0123456789") != std::string::npos) {
    return -1;
  }
  return std::stoll(v);
}

// The fine-tuning thread's pace: forward/backward units per StepMicroBatch call under an
// unbounded grant (one under a bounded one), and calls' work queued on the device at most.
constexpr int64_t kFineTuneUnitsPerCall = 4;
constexpr int kFineTuneQueuedCalls = 2;

int64_t TotalSteps(const FineTuneJobSpec& spec) {
  const int64_t n = static_cast<int64_t>(spec.examples.size());
  return (n + spec.hyper.batch_size - 1) / spec.hyper.batch_size * spec.hyper.n_epochs;
}

FineTuneJobInfo PublicCopy(const FineTuneJobEntry& e) {
  FineTuneJobInfo info = e.info;
  info.spec.examples.clear();
  return info;
}

}  // namespace

std::string EngineImpl::JobDir(const std::string& id) const {
  return (fs::path(options_.finetune.state_dir) / id).string();
}

Status EngineImpl::ValidateFineTuneSpec(const FineTuneJobSpec& spec) const {
  if (spec.method != "lora" && spec.method != "s2ft") {
    return InvalidArgumentError(
        StrCat("method: expected 'lora' or 's2ft', found '", spec.method, "'"));
  }
  if (!ValidAdapterName(spec.adapter) || spec.adapter == base_name_) {
    return InvalidArgumentError(StrCat("adapter name '", spec.adapter, "': expected 1 to 64 ",
                                       "letters, digits, '-', '_' or '.', not the base model's"));
  }
  const FineTuneHyperparameters& h = spec.hyper;
  if (h.n_epochs < 1 || h.batch_size < 1 || h.lora_r < 1 || h.publish_every_steps < 0) {
    return InvalidArgumentError(StrCat("n_epochs, batch_size and lora_r must be >= 1 and ",
                                       "publish_every_steps >= 0, found ", h.n_epochs, ", ",
                                       h.batch_size, ", ", h.lora_r, ", ", h.publish_every_steps));
  }
  if (!(h.learning_rate > 0) || !std::isfinite(h.learning_rate) || !(h.lora_alpha > 0) ||
      !std::isfinite(h.lora_alpha)) {
    return InvalidArgumentError(StrCat("learning_rate and lora_alpha must be positive, found ",
                                       h.learning_rate, " and ", h.lora_alpha));
  }
  if (spec.method == "lora") {
    peft::LoraConfig lc;
    lc.r = h.lora_r;
    lc.alpha = h.lora_alpha;
    lc.target_modules = h.target_modules;
    TANDEM_RETURN_IF_ERROR(peft::ResolveLoraTargets(lc, model_->config()).status());
  } else {
    TANDEM_RETURN_IF_ERROR(peft::ValidateS2ftConfig(S2ftConfigOf(h, "")));
    const model::LlamaConfig& c = model_->config();
    if (std::llround(h.heads_fraction * static_cast<double>(c.num_key_value_heads)) == 0 &&
        std::llround(h.ffn_fraction * static_cast<double>(c.intermediate_size)) == 0) {
      return InvalidArgumentError(StrCat("s2ft: heads_fraction ", h.heads_fraction, " of ",
                                         c.num_key_value_heads, " kv heads and ", "ffn_fraction ",
                                         h.ffn_fraction, " of ", c.intermediate_size,
                                         " FFN channels select nothing to train"));
    }
  }
  if (spec.examples.empty()) return InvalidArgumentError("training data: no examples");
  for (size_t i = 0; i < spec.examples.size(); ++i) {
    const FineTuneExample& e = spec.examples[i];
    const int64_t len = static_cast<int64_t>(e.tokens.size());
    if (len > max_model_len_ || e.loss_from < 0 || e.loss_from >= len) {
      return InvalidArgumentError(StrCat("training example ", i, ": ", len, " tokens (limit ",
                                         max_model_len_, "), loss from ", e.loss_from));
    }
    for (int32_t t : e.tokens) {
      if (t < 0 || t >= model_->config().vocab_size) {
        return InvalidArgumentError(
            StrCat("training example ", i, ": token id ", t, " outside the vocabulary"));
      }
    }
  }
  return Status::Ok();
}

StatusOr<FineTuneJobInfo> EngineImpl::CreateFineTuneJob(FineTuneJobSpec spec) {
  if (options_.finetune.publish_dir.empty()) {
    return FailedPreconditionError(
        "fine-tuning is disabled: start `tandem serve` with --adapter-dir or "
        "--finetune-output-dir");
  }
  TANDEM_RETURN_IF_ERROR(ValidateFineTuneSpec(spec));
  auto job = std::make_shared<FineTuneJobEntry>();
  job->info.status = "queued";
  job->info.created_at = static_cast<int64_t>(std::time(nullptr));
  job->info.num_examples = static_cast<int64_t>(spec.examples.size());
  job->info.total_steps = TotalSteps(spec);
  job->spec = std::move(spec);
  job->info.spec = job->spec;
  job->info.spec.examples.clear();
  {
    std::lock_guard<std::mutex> lock(mu_);
    TANDEM_RETURN_IF_ERROR(CheckAdapterFreeLocked(job->spec.adapter));
    job->info.id = StrCat("ftjob-", next_job_++);
  }
  if (!options_.finetune.state_dir.empty()) {  // outside the lock: the examples may be large
    const std::string dir = JobDir(job->info.id);
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) return InternalError(StrCat("cannot create ", dir, ": ", ec.message()));
    TANDEM_RETURN_IF_ERROR(WriteJobFile(dir, job->info, job->spec));
  }
  std::lock_guard<std::mutex> lock(mu_);
  Status free = CheckAdapterFreeLocked(job->spec.adapter);  // a job made meanwhile
  if (!free.ok()) {
    if (!options_.finetune.state_dir.empty()) {
      std::error_code ec;
      fs::remove_all(JobDir(job->info.id), ec);
    }
    return free;
  }
  jobs_[job->info.id] = job;
  ft_queue_.push_back(job);
  ft_cv_.notify_all();
  return PublicCopy(*job);
}

Status EngineImpl::CheckAdapterFreeLocked(const std::string& adapter) const {
  if (stopping_) return UnavailableError("the engine is shutting down");
  if (adapters_.count(adapter)) {
    return FailedPreconditionError(StrCat("adapter '", adapter, "' is already loaded ",
                                          "(not as versions): pick another name"));
  }
  for (const auto& [id, other] : jobs_) {
    if (other->spec.adapter == adapter && !Finished(other->info.status)) {
      return FailedPreconditionError(
          StrCat("job ", id, " is already training adapter '", adapter, "'"));
    }
  }
  return Status::Ok();
}

std::vector<FineTuneJobInfo> EngineImpl::ListFineTuneJobs() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::shared_ptr<FineTuneJobEntry>> jobs;
  for (const auto& [id, job] : jobs_) jobs.push_back(job);
  std::sort(jobs.begin(), jobs.end(), [](const auto& a, const auto& b) {  // newest first
    return a->info.id.size() != b->info.id.size() ? a->info.id.size() > b->info.id.size()
                                                  : a->info.id > b->info.id;
  });
  std::vector<FineTuneJobInfo> out;
  for (const auto& job : jobs) out.push_back(PublicCopy(*job));
  return out;
}

StatusOr<FineTuneJobInfo> EngineImpl::GetFineTuneJob(const std::string& id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return NotFoundError(StrCat("no fine-tuning job '", id, "'"));
  return PublicCopy(*it->second);
}

StatusOr<FineTuneJobInfo> EngineImpl::CancelFineTuneJob(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return NotFoundError(StrCat("no fine-tuning job '", id, "'"));
  FineTuneJobEntry& job = *it->second;
  if (Finished(job.info.status)) return PublicCopy(job);
  job.cancel_requested = true;  // a running job: the engine thread ends it and snapshots it
  job.info.status = "cancelled";
  job.info.finished_at = static_cast<int64_t>(std::time(nullptr));
  auto queued = std::find(ft_queue_.begin(), ft_queue_.end(), it->second);
  if (queued != ft_queue_.end()) ft_queue_.erase(queued);
  if (!options_.finetune.state_dir.empty()) {  // recorded now, so a restart does not resume it
    Status s = WriteFinalFile(JobDir(id), job.info);
    if (!s.ok()) TANDEM_LOG(WARNING, "serve") << "fine-tuning job file: " << s.ToString();
  }
  ft_cv_.notify_all();
  return PublicCopy(job);
}

// ---- Engine thread ----

Status EngineImpl::StartNextJob() {
  std::shared_ptr<FineTuneJobEntry> job;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (ft_queue_.empty()) return Status::Ok();  // (cancel takes queued jobs out of the queue)
    job = ft_queue_.front();
    ft_queue_.pop_front();
    ft_running_ = true;
  }
  ft_active_ = job;
  TANDEM_ASSIGN_OR_RETURN(job->trainer,
                          FineTuneTrainer::Create(*train_ctx_, *model_, job->spec, base_name_));
  const std::string state = JobDir(job->info.id) + "/state";
  if (!options_.finetune.state_dir.empty() && fs::exists(state)) {
    TANDEM_RETURN_IF_ERROR(job->trainer->ReadState(state).status());
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (job->info.status == "queued") job->info.status = "running";
  return Status::Ok();
}

void EngineImpl::SyncJobInfo(FineTuneJobEntry& job) {
  const FineTuneProgress& p = job.trainer->progress();
  std::lock_guard<std::mutex> lock(mu_);
  job.info.step = p.step;
  job.info.epoch = p.epoch;
  job.info.trained_tokens = p.trained_tokens;
  job.info.loss = p.loss;
  job.info.step_losses = p.step_losses;
  job.info.published = p.published;
  stats_.finetune_loss = p.loss;
}

void EngineImpl::SnapshotJob(FineTuneJobEntry& job, const std::string& status,
                             const std::string& error) {
  if (options_.finetune.state_dir.empty() || !job.trainer) return;
  Status s = job.trainer->WriteState(JobDir(job.info.id) + "/state", status, error);
  if (!s.ok()) TANDEM_LOG(WARNING, "serve") << "fine-tuning snapshot: " << s.ToString();
}

void EngineImpl::EndJob(const std::string& end_status, const std::string& error) {
  std::shared_ptr<FineTuneJobEntry> job = std::move(ft_active_);
  ft_active_.reset();
  if (job->trainer) job->trainer->Abandon();  // a micro-batch in progress detaches the adapter
  std::string status = end_status;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (job->cancel_requested) status = "cancelled";  // what the API already answered
  }
  if (job->trainer) SyncJobInfo(*job);
  SnapshotJob(*job, status, error);
  job->trainer.reset();
  std::lock_guard<std::mutex> lock(mu_);
  job->info.status = status;
  job->info.error = status == "cancelled" ? "" : error;
  if (job->info.finished_at == 0) {
    job->info.finished_at = static_cast<int64_t>(std::time(nullptr));
  }
  ft_running_ = false;
  stats_.finetune_jobs_running = 0;
  if (!options_.finetune.state_dir.empty()) {  // under mu_, like CancelFineTuneJob's write
    Status s = WriteFinalFile(JobDir(job->info.id), job->info);
    if (!s.ok()) TANDEM_LOG(WARNING, "serve") << "fine-tuning job file: " << s.ToString();
  }
  if (status == "failed") {
    TANDEM_LOG(WARNING, "serve") << "fine-tuning job " << job->info.id << " failed: " << error;
  }
}

Status EngineImpl::PublishVersion(FineTuneJobEntry& job) {
  const std::string& name = job.spec.adapter;
  int64_t version = 0;
  for (const std::string& p : job.trainer->progress().published) {
    version = std::max(version, VersionOf(p, name));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [model, entry] : adapters_)
      version = std::max(version, VersionOf(model, name));
  }
  ++version;
  const std::string dir =
      (fs::path(options_.finetune.publish_dir) / StrCat(name, "-v", version)).string();
  TANDEM_RETURN_IF_ERROR(job.trainer->Save(dir));
  const std::string model = StrCat(name, "@", version);
  TANDEM_RETURN_IF_ERROR(LoadAdapter(model, dir));  // a new entry: old versions keep serving
  job.trainer->progress().published.push_back(model);
  return Status::Ok();
}

void EngineImpl::RevokeFineTuneGrantLocked() {
  ft_grant_ = FineTuneGrant{ft_grant_.seq + 1, 0, 0, false, false};
}

void EngineImpl::GrantFineTune(int64_t leftover, bool all_admitted, bool idle) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!incoming_.empty()) return RevokeFineTuneGrantLocked();  // the next iteration's requests
  FineTuneGrant g;
  g.seq = ft_grant_.seq + 1;
  if (!idle) {
    const int64_t busy = options_.finetune.busy_units;
    g.units = busy <= 0 ? INT64_MAX : busy;
    g.leftover = leftover;
    g.all_admitted = all_admitted;
    g.idle = false;
  }
  ft_grant_ = g;
  if (ft_running_ || !ft_queue_.empty()) ft_cv_.notify_all();
}

void EngineImpl::FineTuneLoop() {
#ifdef TANDEM_WITH_CUDA
  if (train_ctx_->is_cuda())
    (void)cudaSetDevice(train_ctx_->device().index);  // the current device is per thread
#endif
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      ft_cv_.wait(lock, [&] {
        if (stopping_) return true;
        if (ft_active_) return ft_grant_.units > 0 || ft_active_->cancel_requested;
        return !ft_queue_.empty() && ft_grant_.units > 0;
      });
      if (stopping_) break;
    }
    RunFineTune();
  }
  // Shutdown: a job in progress stays "running" on disk and resumes from its last snapshot.
  if (ft_active_ && ft_active_->trainer) ft_active_->trainer->Abandon();
  (void)train_ctx_->Synchronize();
}

void EngineImpl::RunFineTune() {
  if (!ft_active_) {
    Status s = StartNextJob();
    if (!s.ok() && ft_active_) return EndJob("failed", s.ToString());
    if (!ft_active_) return;
  }
  FineTuneJobEntry& job = *ft_active_;
  bool cancelled = false;
  FineTuneGrant grant;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.finetune_jobs_running = 1;
    cancelled = job.cancel_requested;
    grant = ft_grant_;
  }
  if (cancelled) return EndJob("cancelled", "");
  const int64_t micro = std::max<int64_t>(options_.finetune.micro_batch_tokens, 1);
  // A new micro-batch only in what inference leaves: new requests first, then the budget.
  const bool waits =
      !job.trainer->in_micro_batch() && !grant.idle &&
      (!grant.all_admitted || job.trainer->NextMicroTokens(micro) > grant.leftover - 1);
  if (waits) {  // until the next grant
    std::lock_guard<std::mutex> lock(mu_);
    if (ft_grant_.seq == grant.seq) ft_grant_.units = 0;
    return;
  }
  // While requests are served, on the SMs set apart for fine-tuning (when there are some).
  if (options_.finetune.busy_sms > 0 && train_ctx_->is_cuda()) {
    const Status lane = train_ctx_->UseSmPartition(!grant.idle);
    if (!lane.ok()) return EndJob("failed", lane.ToString());
  }
  // A few units per call, one while serving, so that every unit sees the newest grant.
  const int64_t units = grant.units == INT64_MAX ? kFineTuneUnitsPerCall : 1;
  StatusOr<std::optional<MicroBatchResult>> step =
      job.trainer->StepMicroBatch(*model_, micro, units);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (ft_grant_.seq == grant.seq && ft_grant_.units != INT64_MAX) --ft_grant_.units;
  }
  if (!step.ok()) return EndJob("failed", step.status().ToString());
  const Status paced = train_ctx_->Pace(kFineTuneQueuedCalls);
  if (!paced.ok()) return EndJob("failed", paced.ToString());
  if (!step->has_value()) return;  // continues with the next units
  const std::optional<MicroBatchResult>& r = *step;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.finetune_tokens += r->tokens;
    if (r->step_done) ++stats_.finetune_steps;
  }
  if (r->step_done) {
    const int64_t step = job.trainer->progress().step;
    const int64_t every = job.spec.hyper.publish_every_steps;
    const bool publish = r->epoch_done || (every > 0 && step % every == 0);
    if (publish) {
      Status s = PublishVersion(job);
      if (!s.ok()) return EndJob("failed", s.ToString());
    }
    if (job.trainer->done()) return EndJob("succeeded", "");
    const int64_t snap = options_.finetune.snapshot_every_steps;
    if (publish || (snap > 0 && step % snap == 0)) SnapshotJob(job, "running", "");
  }
  SyncJobInfo(job);  // after each micro-batch
}

// ---- Start ----

namespace {

// A job as recorded under `dir` (job.json, and the progress of its state file when there is one).
StatusOr<std::shared_ptr<FineTuneJobEntry>> LoadJobEntry(const fs::path& dir) {
  auto job = std::make_shared<FineTuneJobEntry>();
  TANDEM_RETURN_IF_ERROR(ReadJobFiles(dir.string(), &job->spec, &job->info));
  StatusOr<FineTuneStateMeta> meta = ReadFineTuneStateMeta((dir / "state").string());
  if (meta.ok()) {
    const FineTuneProgress& p = meta->progress;
    job->info.step = p.step;
    job->info.epoch = p.epoch;
    job->info.trained_tokens = p.trained_tokens;
    job->info.loss = p.loss;
    job->info.step_losses = p.step_losses;
    job->info.published = p.published;
  }
  job->info.num_examples = static_cast<int64_t>(job->spec.examples.size());
  job->info.total_steps = TotalSteps(job->spec);
  job->info.spec = job->spec;
  job->info.spec.examples.clear();
  job->info.resumed = !Finished(job->info.status);
  return job;
}

}  // namespace

Status EngineImpl::ResumeFineTuneJobs() {
  const std::string& root = options_.finetune.state_dir;
  if (root.empty() || !fs::is_directory(root)) return Status::Ok();
  std::vector<std::shared_ptr<FineTuneJobEntry>> found;
  for (const fs::directory_entry& d : fs::directory_iterator(root)) {
    if (!d.is_directory() || !fs::exists(d.path() / "job.json")) continue;
    StatusOr<std::shared_ptr<FineTuneJobEntry>> job = LoadJobEntry(d.path());
    if (!job.ok()) {
      TANDEM_LOG(WARNING, "serve") << "skipping fine-tuning job: " << job.status().ToString();
      continue;
    }
    found.push_back(std::move(*job));
  }
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) {
    return a->info.created_at != b->info.created_at ? a->info.created_at < b->info.created_at
                                                    : a->info.id < b->info.id;
  });
  for (auto& job : found) {
    // Published versions come back under their names.
    for (const std::string& model : job->info.published) {
      const int64_t v = VersionOf(model, job->spec.adapter);
      const fs::path dir =
          fs::path(options_.finetune.publish_dir) / StrCat(job->spec.adapter, "-v", v);
      if (v < 0 || options_.finetune.publish_dir.empty() || !fs::exists(dir)) continue;
      Status s = LoadAdapter(model, dir.string());
      if (!s.ok()) TANDEM_LOG(WARNING, "serve") << "reloading " << model << ": " << s.ToString();
    }
    std::lock_guard<std::mutex> lock(mu_);
    const std::string& id = job->info.id;
    if (id.rfind("ftjob-", 0) == 0 && id.size() > 6 && id.size() < 16 &&
        id.find_first_not_of("0123456789", 6) == std::string::npos) {
      next_job_ = std::max<int64_t>(next_job_, std::stoll(id.substr(6)) + 1);
    }
    if (!Finished(job->info.status)) ft_queue_.push_back(job);
    jobs_[id] = std::move(job);
  }
  return Status::Ok();
}

}  // namespace tandem::serve::internal
