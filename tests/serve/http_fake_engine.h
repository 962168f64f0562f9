// FakeEngine: a deterministic Engine for HTTP tests. Every request answers with the bytes of
// kReply (byte tokenizer: one token per byte), one token every `token_delay`, each on the
// request's own thread; then EOS ("stop"), or "length" at max_tokens. Records requests and
// cancellations so tests can check what the server passed on; can fail mid-generation.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "serve/engine.h"

namespace tandem::serve::testing {

inline constexpr char kReply[] = "Hello, world!";

class FakeEngine : public Engine {
 public:
  FakeEngine() : tokenizer_(model::MakeByteTokenizer()) {
    models_.push_back({"base", "", "/models/base"});
    models_.push_back({"ad1", "base", "/adapters/ad1"});
  }
  ~FakeEngine() override { Shutdown(); }

  std::chrono::milliseconds token_delay{1};
  std::atomic<bool> overloaded{false};
  std::atomic<bool> fail_after_first_token{false};  // then finish with "error"
  int64_t model_len = 512;

  StatusOr<RequestId> Submit(GenerationRequest request, EventCallback on_event) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_) return UnavailableError("engine stopped");
    if (overloaded) return UnavailableError("queue full: 1024 requests waiting");
    bool known = false;
    for (const ModelInfo& m : models_) known = known || m.id == request.model;
    if (!known) return NotFoundError("unknown model '" + request.model + "'");
    const RequestId id = next_id_++;
    requests_.push_back(request);
    auto cancel = std::make_shared<std::atomic<bool>>(false);
    cancel_flags_[id] = cancel;
    threads_.emplace_back([this, id, request = std::move(request), on_event, cancel] {
      Run(id, request, on_event, *cancel);
    });
    return id;
  }

  void Cancel(RequestId id) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = cancel_flags_.find(id);
    if (it != cancel_flags_.end() && !it->second->exchange(true)) ++cancels_;
  }

  std::vector<ModelInfo> Models() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return models_;
  }
  Status LoadAdapter(const std::string& name, const std::string& path) override {
    std::lock_guard<std::mutex> lock(mu_);
    for (const ModelInfo& m : models_) {
      if (m.id == name) return InvalidArgumentError("adapter '" + name + "' is already loaded");
    }
    models_.push_back({name, "base", path});
    return Status::Ok();
  }
  Status UnloadAdapter(const std::string& name) override {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 1; i < models_.size(); ++i) {
      if (models_[i].id == name) {
        models_.erase(models_.begin() + static_cast<std::ptrdiff_t>(i));
        return Status::Ok();
      }
    }
    return NotFoundError("no adapter named '" + name + "'");
  }
  EngineStats Stats() const override {
    EngineStats s;
    s.waiting = 2;
    s.running = 3;
    s.pool_pages_total = 100;
    s.pool_pages_kv = 40;
    s.pool_pages_adapter = 7;
    s.adapter_loads = 5;
    s.decode_graph_captures = 2;
    s.decode_graph_replays = 9;
    return s;
  }
  const model::Tokenizer& tokenizer() const override { return *tokenizer_; }
  const std::string& base_model_name() const override { return models_[0].id; }
  int64_t max_model_len() const override { return model_len; }

  void Shutdown() override {
    std::vector<std::thread> threads;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopped_ = true;
      for (auto& [id, flag] : cancel_flags_) flag->store(true);
      threads.swap(threads_);
    }
    for (std::thread& t : threads) t.join();
  }

  int cancels() const { return cancels_.load(); }
  std::vector<GenerationRequest> requests() const {
    std::lock_guard<std::mutex> lock(mu_);
    return requests_;
  }

 private:
  void Run(RequestId id, const GenerationRequest& r, const EventCallback& emit,
           const std::atomic<bool>& cancel) {
    const std::string reply = kReply;
    const int64_t prompt = static_cast<int64_t>(r.prompt_tokens.size());
    int64_t n = 0;
    while (true) {
      std::this_thread::sleep_for(token_delay);
      TokenEvent e;
      e.id = id;
      e.prompt_tokens = prompt;
      if (cancel.load()) {
        e.finished = true;
        e.finish_reason = "cancelled";
        e.completion_tokens = n;
        emit(e);
        return;
      }
      if (n == 1 && fail_after_first_token) {
        e.finished = true;
        e.finish_reason = "error";
        e.error = "device lost";
        e.completion_tokens = n;
        emit(e);
        return;
      }
      const bool eos = n == static_cast<int64_t>(reply.size());
      e.has_token = true;
      e.token = eos ? *tokenizer_->eos_id() : static_cast<unsigned char>(reply[n]);
      e.text = eos ? "" : std::string(1, reply[n]);
      e.logprob = -0.25f * static_cast<float>(n + 1);
      for (int k = 0; k < r.sampling.logprobs; ++k) {
        e.top_logprobs.push_back({e.token + k, e.logprob - static_cast<float>(k)});
      }
      ++n;
      e.completion_tokens = n;
      e.finished = eos || n == r.sampling.max_tokens;
      if (e.finished) e.finish_reason = eos ? "stop" : "length";
      emit(e);
      if (e.finished) return;
    }
  }

  std::unique_ptr<model::Tokenizer> tokenizer_;
  mutable std::mutex mu_;
  std::vector<ModelInfo> models_;
  std::vector<GenerationRequest> requests_;
  std::map<RequestId, std::shared_ptr<std::atomic<bool>>> cancel_flags_;
  std::vector<std::thread> threads_;
  std::atomic<int> cancels_{0};
  RequestId next_id_ = 1;
  bool stopped_ = false;
};

}  // namespace tandem::serve::testing
