// One engine iteration: scheduling, the batched forward, sampling and events
// (serve/internal/engine_impl.h describes the policy).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <unordered_map>

#include "ops/sampling.h"
#include "serve/internal/engine_impl.h"

namespace tandem::serve::internal {

// ---- Pages ----

bool EngineImpl::GrowBlocks(RequestState& r, int64_t positions) {
  const int64_t L = infer_->num_layers(), bt = infer_->block_tokens();
  const int64_t need = (positions + bt - 1) / bt - r.blocks_held();
  if (need <= 0) return true;
  std::vector<int32_t> pages;
  if (!pool_.Allocate(PageUse::kKv, need * L, &pages)) return false;
  if (r.blocks.empty()) r.blocks.assign(L, {});
  for (int64_t b = 0; b < need; ++b) {
    for (int64_t l = 0; l < L; ++l) r.blocks[l].push_back(pages[b * L + l]);
  }
  return true;
}

void EngineImpl::FreeBlocks(RequestState& r) {
  std::vector<int32_t> pages;
  for (const auto& layer : r.blocks) pages.insert(pages.end(), layer.begin(), layer.end());
  pool_.Free(PageUse::kKv, pages);
  r.blocks.clear();
  r.computed = 0;
}

RequestState* EngineImpl::PreemptNewest() {
  if (running_.empty()) return nullptr;
  std::unique_ptr<RequestState> r = std::move(running_.back());
  running_.pop_back();
  FreeBlocks(*r);
  if (r->adapter) ReleaseAdapter(*r->adapter);
  RequestState* raw = r.get();
  waiting_.push_front(std::move(r));  // recomputed from its tokens when readmitted
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.preemptions;
  return raw;
}

// ---- Adapters ----

bool EngineImpl::EvictUnusedAdapter(const AdapterEntry* keep) {
  auto victim = resident_.end();
  for (auto it = resident_.begin(); it != resident_.end(); ++it) {
    if (it->get() == keep || (*it)->refs > 0) continue;
    if (victim == resident_.end() || (*it)->last_used < (*victim)->last_used) victim = it;
  }
  if (victim == resident_.end()) return false;
  pool_.Free(PageUse::kAdapter, (*victim)->pages);
  (*victim)->pages.clear();
  (*victim)->device.reset();
  infer_->ForgetAdapters();
  resident_.erase(victim);
  return true;
}

StatusOr<bool> EngineImpl::MakeResident(const std::shared_ptr<AdapterEntry>& entry) {
  AdapterEntry& a = *entry;
  a.last_used = iteration_;
  if (a.resident()) return true;
  const int64_t need = std::max<int64_t>(pool_.PagesFor(a.weight_bytes), 1);
  // Evict unused resident adapters, least recently used first, until the pages fit.
  while (pool_.free_pages() < need) {
    if (!EvictUnusedAdapter(&a)) return false;
  }
  if (!a.host) TANDEM_RETURN_IF_ERROR(LoadHostCopy(a));  // from disk
  TANDEM_ASSIGN_OR_RETURN(AdapterWeights w,
                          AdapterWeights::FromLora(*ctx_, *a.host, model_->compute_dtype()));
  a.device = std::make_unique<AdapterWeights>(std::move(w));
  TANDEM_CHECK(pool_.Allocate(PageUse::kAdapter, need, &a.pages));
  resident_.push_back(entry);
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.adapter_loads;
  return true;
}

void EngineImpl::ReleaseAdapter(AdapterEntry& a) {
  --a.refs;
  TANDEM_CHECK(a.refs >= 0);
}

void EngineImpl::DropUnloadedAdapters() {
  for (auto it = resident_.begin(); it != resident_.end();) {
    AdapterEntry& a = **it;
    if (!a.unloaded || a.refs > 0) {
      ++it;
      continue;
    }
    pool_.Free(PageUse::kAdapter, a.pages);
    a.pages.clear();
    a.device.reset();
    infer_->ForgetAdapters();
    it = resident_.erase(it);
  }
}

void EngineImpl::TrimHostCache() {
  std::vector<AdapterEntry*> cached;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [name, e] : adapters_) {
      if (e->host) cached.push_back(e.get());
    }
  }
  int64_t excess =
      static_cast<int64_t>(cached.size()) - std::max<int64_t>(options_.host_adapter_cache, 0);
  if (excess <= 0) return;
  std::sort(cached.begin(), cached.end(), [](const AdapterEntry* a, const AdapterEntry* b) {
    return a->last_used < b->last_used;
  });
  std::set<const AdapterEntry*> next;  // the next waiting requests' (just read for them)
  for (size_t w = 0; w < waiting_.size() && w < 4; ++w) next.insert(waiting_[w]->adapter.get());
  for (AdapterEntry* e : cached) {
    if (excess == 0) break;
    if (e->resident() || e->refs > 0 || next.count(e)) continue;  // resident: the CPU compute copy
    e->host.reset();  // back to the disk tier; reloaded by Prefetch or MakeResident
    e->host_ctx.reset();
    --excess;
  }
}

void EngineImpl::Prefetch() {
  // The host tier for the next waiting requests' adapters, read on the loader's thread.
  int n = 0;
  for (auto& r : waiting_) {
    if (++n > 4) break;
    if (r->adapter && !r->adapter->host && !r->adapter->resident()) {
      r->adapter->last_used = iteration_;
      loader_->Request(r->adapter);
    }
  }
}

void EngineImpl::CollectLoads() {
  for (AdapterLoader::Done& done : loader_->TakeDone()) {
    AdapterEntry& a = *done.entry;
    if (done.result.ok()) {
      if (!a.host) InstallHostCopy(a, std::move(*done.result));
      a.last_used = iteration_;
      continue;
    }
    // A failed read fails the requests waiting for it (a later request asks again).
    for (size_t w = 0; w < waiting_.size();) {
      if (waiting_[w]->adapter.get() != &a) {
        ++w;
        continue;
      }
      std::unique_ptr<RequestState> dead = std::move(waiting_[w]);
      waiting_.erase(waiting_.begin() + static_cast<std::ptrdiff_t>(w));
      Finish(*dead, "error", done.result.status().ToString());
    }
  }
}

// ---- Requests ----

void EngineImpl::Finish(RequestState& r, const std::string& reason, const std::string& error) {
  if (!r.blocks.empty()) FreeBlocks(r);
  TokenEvent e;
  e.id = r.id;
  e.finished = true;
  e.finish_reason = reason;
  e.error = error;
  e.prompt_tokens = r.num_prompt;
  e.completion_tokens = r.generated;
  if (r.on_event) r.on_event(e);
}

void EngineImpl::CancelNow(RequestId id) {
  for (auto it = running_.begin(); it != running_.end(); ++it) {
    if ((*it)->id != id) continue;
    std::unique_ptr<RequestState> r = std::move(*it);
    running_.erase(it);
    if (r->adapter) ReleaseAdapter(*r->adapter);
    Finish(*r, "cancelled", "");
    return;
  }
  for (auto it = waiting_.begin(); it != waiting_.end(); ++it) {
    if ((*it)->id != id) continue;
    std::unique_ptr<RequestState> r = std::move(*it);
    waiting_.erase(it);
    Finish(*r, "cancelled", "");
    return;
  }
  std::unique_ptr<RequestState> r;
  {
    std::lock_guard<std::mutex> lock(mu_);  // not yet taken from the intake queue
    for (auto it = incoming_.begin(); it != incoming_.end(); ++it) {
      if ((*it)->id != id) continue;
      r = std::move(*it);
      incoming_.erase(it);
      break;
    }
  }
  if (r) Finish(*r, "cancelled", "");  // outside the lock: callbacks never run under mu_
}

void EngineImpl::FailAll(const Status& error) {
  for (auto& r : running_) {
    if (r->adapter) ReleaseAdapter(*r->adapter);
    Finish(*r, "error", error.ToString());
  }
  running_.clear();
}

bool EngineImpl::NeedsFullRow(const RequestState& r) {
  return r.gen.sampling.temperature != 0.0f || r.gen.sampling.logprobs >= 0;
}

StatusOr<bool> EngineImpl::Emit(RequestState& r, int32_t greedy, const float* logits,
                                int64_t vocab) {
  const SamplingParams& s = r.gen.sampling;
  const int64_t usable = std::min<int64_t>(vocab, tokenizer_->vocab_size());
  int32_t token = greedy;
  std::span<const float> row;
  if (logits != nullptr) {
    row = std::span<const float>(logits, static_cast<size_t>(usable));
    TANDEM_ASSIGN_OR_RETURN(
        token, SampleToken(row, {.temperature = s.temperature, .top_k = s.top_k, .top_p = s.top_p},
                           r.rng));
  } else if (greedy == ops::kArgmaxInvalidRow) {
    return InvalidArgumentError(StrCat("sampling: request ", r.id, ": expected finite logits, ",
                                       "found a NaN or +inf (or only -inf) among the first ",
                                       usable, " (argmax on the device)"));
  }
  TokenEvent e;
  e.id = r.id;
  e.has_token = true;
  e.token = token;
  if (s.logprobs >= 0) {
    double max_l = -INFINITY, sum = 0.0;
    for (float v : row) max_l = std::max<double>(max_l, v);
    for (float v : row) sum += std::exp(static_cast<double>(v) - max_l);
    const double lse = max_l + std::log(sum);
    e.logprob = static_cast<float>(row[token] - lse);
    std::vector<int32_t> ids(row.size());
    std::iota(ids.begin(), ids.end(), 0);
    const size_t k = std::min<size_t>(s.logprobs, ids.size());
    std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t a, int32_t b) {
      return row[a] > row[b] || (row[a] == row[b] && a < b);
    });
    for (size_t i = 0; i < k; ++i) {
      e.top_logprobs.push_back({ids[i], static_cast<float>(row[ids[i]] - lse)});
    }
  }
  r.tokens.push_back(token);
  ++r.generated;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.generated_tokens;
  }
  e.completion_tokens = r.generated;
  e.prompt_tokens = r.num_prompt;
  std::string reason;
  if (!s.ignore_eos && eos_ids_.count(token)) {
    reason = "stop";
  } else {
    TextStream::Step step = r.text->Add(token);
    e.text = std::move(step.text);
    if (step.stopped) reason = "stop";
  }
  if (reason.empty() &&
      (r.generated >= s.max_tokens || static_cast<int64_t>(r.tokens.size()) >= max_model_len_)) {
    reason = "length";
    e.text += r.text->Flush();
  }
  if (!reason.empty()) {
    e.finished = true;
    e.finish_reason = reason;
    FreeBlocks(r);  // before the event: a client that sees "finished" sees its pages free
  }
  if (r.on_event) r.on_event(e);
  return !reason.empty();
}

// ---- One iteration ----

int64_t EngineImpl::Admit(std::vector<Scheduled>& batch, int64_t budget) {
  waiting_on_loads_ = false;
  bool passed_over = false;
  for (size_t w = 0; w < waiting_.size() && budget > 0 &&
                     static_cast<int64_t>(running_.size()) < options_.max_running;) {
    RequestState* r = waiting_[w].get();
    auto drop = [&](const std::string& error) {
      std::unique_ptr<RequestState> dead = std::move(waiting_[w]);
      waiting_.erase(waiting_.begin() + static_cast<std::ptrdiff_t>(w));
      Finish(*dead, "error", error);
    };
    if (r->adapter && !r->adapter->resident() && !r->adapter->host) {
      loader_->Request(r->adapter);  // its own adapter is read; later requests may go first
      passed_over = true;
      ++w;
      continue;
    }
    if (r->adapter) {
      StatusOr<bool> ok = MakeResident(r->adapter);
      const bool idle = running_.empty() && batch.empty();
      if (!ok.ok() || (!*ok && idle)) {  // a broken adapter, or one larger than the whole pool
        drop(ok.ok() ? StrCat("adapter '", r->adapter->name, "' needs more pages than the ",
                              "pool can free (", pool_.num_pages(), " pages)")
                     : ok.status().ToString());
        continue;
      }
      if (!*ok) break;
    }
    const int64_t chunk =
        std::min<int64_t>(static_cast<int64_t>(r->tokens.size()) - r->computed, budget);
    bool grown = GrowBlocks(*r, r->computed + chunk);
    while (!grown && EvictUnusedAdapter(r->adapter.get())) {
      grown = GrowBlocks(*r, r->computed + chunk);
    }
    if (!grown) {
      if (running_.empty() && batch.empty()) {  // nothing runs and it still does not fit
        drop(StrCat("the request needs more KV pages than the pool holds (", pool_.num_pages(),
                    " pages)"));
        continue;
      }
      break;
    }
    if (r->adapter) ++r->adapter->refs;
    if (!r->admitted_once) {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.prompt_tokens += r->num_prompt;
    }
    r->admitted_once = true;
    running_.push_back(std::move(waiting_[w]));
    waiting_.erase(waiting_.begin() + static_cast<std::ptrdiff_t>(w));
    batch.push_back({r, chunk});
    budget -= chunk;
  }
  // Nothing to run but reads to wait for: the loop sleeps until one finishes.
  waiting_on_loads_ = passed_over && batch.empty() && running_.empty();
  return budget;
}

Status EngineImpl::Step() {
  const auto start = std::chrono::steady_clock::now();
  ++iteration_;
  CollectLoads();
  DropUnloadedAdapters();
  int64_t budget = options_.max_batch_tokens;
  std::vector<Scheduled> batch;
  // 1. Running requests, oldest first.
  for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
    RequestState* r = running_[i].get();
    const int64_t chunk =
        std::min<int64_t>(static_cast<int64_t>(r->tokens.size()) - r->computed, budget);
    bool preempted_self = false;
    while (!GrowBlocks(*r, r->computed + chunk)) {
      if (EvictUnusedAdapter(nullptr)) continue;  // cheaper than preempting a request
      RequestState* victim = PreemptNewest();
      if (victim == r) {
        preempted_self = true;
        break;
      }
    }
    if (preempted_self) {
      if (running_.empty()) {  // alone in the pool and still short: it can never fit
        std::unique_ptr<RequestState> dead = std::move(waiting_.front());
        waiting_.pop_front();
        Finish(*dead, "error",
               StrCat("the request needs more KV pages than the pool holds (", pool_.num_pages(),
                      " pages, its adapter's included) at ", dead->tokens.size(), " positions"));
      }
      break;  // r was the newest: nothing after it runs either
    }
    batch.push_back({r, chunk});
    budget -= chunk;
  }
  // 2. Admission.
  budget = Admit(batch, budget);
  Prefetch();
  TrimHostCache();
  const int64_t leftover = budget;
  const bool all_admitted = waiting_.empty();
  if (!batch.empty()) {
    TANDEM_RETURN_IF_ERROR(RunBatch(batch));
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.iterations;
    stats_.batch_seconds += seconds;
  }
  // 4. Fine-tuning in the leftover budget.
  GrantFineTune(leftover, all_admitted, batch.empty() || (running_.empty() && waiting_.empty()));
  return Status::Ok();
}

Status EngineImpl::RunBatch(std::vector<Scheduled>& batch) {
  // 3. Forward, adapters grouped.
  std::stable_sort(batch.begin(), batch.end(), [](const Scheduled& a, const Scheduled& b) {
    return a.req->adapter.get() < b.req->adapter.get();
  });
  // Every resident adapter, in residency order: the list (and InferModel's LoRA tables over it)
  // changes only when an adapter is loaded or evicted, not with the batch's mix.
  std::vector<const AdapterWeights*> adapters;
  std::unordered_map<const AdapterEntry*, int32_t> slot;
  for (const auto& entry : resident_) {
    slot[entry.get()] = static_cast<int32_t>(adapters.size());
    adapters.push_back(entry->compute());
  }
  std::vector<SeqChunk> seqs;
  for (const Scheduled& s : batch) {
    SeqChunk c;
    c.start = s.req->computed;
    c.tokens.assign(s.req->tokens.begin() + c.start, s.req->tokens.begin() + c.start + s.chunk);
    c.blocks = &s.req->blocks;
    if (s.req->adapter) c.adapter = slot.at(s.req->adapter.get());
    seqs.push_back(std::move(c));
  }
  TANDEM_ASSIGN_OR_RETURN(Tensor logits, infer_->ForwardLogits(kv_pages_, seqs, adapters));
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.lora_table_builds = infer_->lora_table_builds();
    const InferModel::GraphStats graphs = infer_->graph_stats();
    stats_.decode_graph_captures = graphs.captures;
    stats_.decode_graph_replays = graphs.replays;
  }
  const int64_t V = logits.dim(1);
  // Greedy ids come from the device; whole rows only for sampling with temperature or logprobs.
  std::vector<int64_t> full_rows;
  std::vector<int64_t> full_index(batch.size(), -1);
  for (size_t i = 0; i < batch.size(); ++i) {
    const RequestState& r = *batch[i].req;
    const bool emits = r.computed + batch[i].chunk >= static_cast<int64_t>(r.tokens.size());
    if (!emits || !NeedsFullRow(r)) continue;
    full_index[i] = static_cast<int64_t>(full_rows.size());
    full_rows.push_back(static_cast<int64_t>(i));
  }
  const int64_t usable = std::min<int64_t>(V, tokenizer_->vocab_size());
  TANDEM_ASSIGN_OR_RETURN(InferModel::SamplerInputs host,
                          infer_->FetchForSampling(logits, full_rows, usable));
  std::vector<RequestId> done;
  for (size_t i = 0; i < batch.size(); ++i) {
    RequestState& r = *batch[i].req;
    r.computed += batch[i].chunk;
    if (r.computed < static_cast<int64_t>(r.tokens.size())) continue;  // prefill continues
    const float* row = full_index[i] < 0 ? nullptr : host.rows.data<float>() + full_index[i] * V;
    StatusOr<bool> finished = Emit(r, host.argmax[i], row, V);
    // A broken row (NaN logits) ends its own request only: failing the whole batch here would
    // send a second final event to requests that already finished in this loop.
    if (!finished.ok()) Finish(r, "error", finished.status().ToString());
    if (!finished.ok() || *finished) done.push_back(r.id);
  }
  for (RequestId id : done) {
    auto it =
        std::find_if(running_.begin(), running_.end(), [&](const auto& r) { return r->id == id; });
    std::unique_ptr<RequestState> r = std::move(*it);
    running_.erase(it);
    FreeBlocks(*r);
    if (r->adapter) ReleaseAdapter(*r->adapter);
  }
  return Status::Ok();
}

}  // namespace tandem::serve::internal
