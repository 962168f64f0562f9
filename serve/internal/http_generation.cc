#include "serve/internal/http_generation.h"

#include <ctime>
#include <memory>
#include <span>
#include <utility>
#include <vector>

namespace tandem::serve::internal {
namespace {

using Clock = std::chrono::steady_clock;
constexpr std::chrono::milliseconds kPollInterval(100);

// One request in flight: its events and the bookkeeping for metrics and logprobs.
struct Generation {
  EventQueue events;
  RequestId id = 0;
  ResponseMeta meta;
  Clock::time_point arrival = Clock::now();
  Clock::time_point first_token;
  int64_t tokens = 0;
  int64_t text_bytes = 0;  // completion text so far (text_offset of the next token)
  bool finished = false;
  bool cancel_sent = false;
};

std::string TokenText(const model::Tokenizer& tok, int32_t id) {
  return tok.Decode(std::span<const int32_t>(&id, 1));
}

// Records timing, and appends the event's token with logprobs to `infos` when asked for.
void Track(const GenerationContext& ctx, const TokenEvent& e, Generation* g,
           std::vector<TokenLogprobInfo>* infos) {
  if (e.has_token) {
    if (g->tokens++ == 0) {
      g->first_token = Clock::now();
      ctx.metrics->ObserveTtft(std::chrono::duration<double>(g->first_token - g->arrival).count());
    }
    if (g->meta.logprobs) {
      const model::Tokenizer& tok = ctx.engine->tokenizer();
      TokenLogprobInfo info{TokenText(tok, e.token), e.logprob, {}, g->text_bytes};
      for (const TokenLogprob& t : e.top_logprobs) {
        info.top.emplace_back(TokenText(tok, t.token), t.logprob);
      }
      infos->push_back(std::move(info));
    }
  }
  g->text_bytes += static_cast<int64_t>(e.text.size());
  if (e.finished) {
    g->finished = true;
    if (g->tokens >= 2) {
      const double decode_s = std::chrono::duration<double>(Clock::now() - g->first_token).count();
      ctx.metrics->ObserveTpot(decode_s / static_cast<double>(g->tokens - 1));
    }
  }
}

// The engine's "cancelled" is vLLM's "abort"; "stop" and "length" pass through.
std::string FinishReason(const TokenEvent& e) {
  return e.finish_reason == "cancelled" ? "abort" : e.finish_reason;
}

ApiError EngineFailure(const TokenEvent& e) {
  return ApiError{500, "generation failed: " + e.error, "internal_error", "", ""};
}

// Waits for the next event; on server shutdown cancels the request (its last event follows).
bool NextEvent(const GenerationContext& ctx, Generation* g, TokenEvent* e) {
  if (!g->cancel_sent && ctx.stopping->load()) {
    ctx.engine->Cancel(g->id);
    g->cancel_sent = true;
  }
  return g->events.Pop(e, kPollInterval);
}

void RespondWhole(const GenerationContext& ctx, std::shared_ptr<Generation> g,
                  httplib::Response* res) {
  std::string text;
  std::vector<TokenLogprobInfo> infos;
  TokenEvent e;
  while (!g->finished) {
    if (!NextEvent(ctx, g.get(), &e)) continue;
    Track(ctx, e, g.get(), &infos);
    text += e.text;
  }
  if (e.finish_reason == "error") return SendError(EngineFailure(e), res);
  if (e.finish_reason == "cancelled") {
    return SendError(
        {503, "the request was cancelled: the server is shutting down", "server_shutdown", "", ""},
        res);
  }
  res->status = 200;
  res->set_content(
      FullResponse(g->meta, text, infos, FinishReason(e), e.prompt_tokens, e.completion_tokens),
      "application/json");
}

// Writes the SSE stream; returns false (and cancels) when the client is gone.
bool WriteStream(const GenerationContext& ctx, Generation* g, httplib::DataSink& sink) {
  auto write = [&](const std::string& s) { return sink.write(s.data(), s.size()); };
  if (g->meta.endpoint == Endpoint::kChat && !write(RoleChunk(g->meta))) {
    ctx.engine->Cancel(g->id);
    return false;
  }
  TokenEvent e;
  while (!g->finished) {
    if (!NextEvent(ctx, g, &e)) continue;
    std::vector<TokenLogprobInfo> infos;
    Track(ctx, e, g, &infos);
    std::string out;
    if (e.finished && e.finish_reason == "error") {
      out = ErrorChunk(EngineFailure(e));
    } else if (e.finished) {
      out = StreamChunk(g->meta, e.text, infos, FinishReason(e));
      if (g->meta.include_usage) out += UsageChunk(g->meta, e.prompt_tokens, e.completion_tokens);
    } else if (!e.text.empty() || !infos.empty()) {
      out = StreamChunk(g->meta, e.text, infos, "");
    }
    if (g->finished) out += kDoneChunk;
    if (!out.empty() && !write(out)) {
      ctx.engine->Cancel(g->id);
      return false;
    }
  }
  sink.done();
  return true;
}

// The prompt's token ids, or the error to send.
std::optional<ApiError> PromptTokens(const GenerationContext& ctx, const ApiRequest& r,
                                     std::vector<int32_t>* ids) {
  const model::Tokenizer& tok = ctx.engine->tokenizer();
  if (r.endpoint == Endpoint::kChat) {
    StatusOr<std::string> prompt = ctx.chat_template->Render(r.messages, r.add_generation_prompt,
                                                             ctx.bos_token, ctx.eos_token);
    if (!prompt.ok()) {
      return BadRequest("the chat template refused the messages: " + prompt.status().message(),
                        "messages");
    }
    *ids = tok.Encode(*prompt);
    return std::nullopt;
  }
  if (!r.prompt_is_text) {
    for (int32_t id : r.prompt_tokens) {
      if (id >= tok.vocab_size()) {
        return BadRequest(StrCat("'prompt' token id ", id, " is outside the vocabulary of ",
                                 tok.vocab_size(), " tokens"),
                          "prompt");
      }
    }
    *ids = r.prompt_tokens;
    return std::nullopt;
  }
  if (tok.bos_id()) ids->push_back(*tok.bos_id());
  std::vector<int32_t> text_ids = tok.Encode(r.prompt_text);
  ids->insert(ids->end(), text_ids.begin(), text_ids.end());
  return std::nullopt;
}

}  // namespace

void EventQueue::Push(const TokenEvent& event) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(event);
  }
  cv_.notify_one();
}

bool EventQueue::Pop(TokenEvent* event, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!cv_.wait_for(lock, timeout, [&] { return !events_.empty(); })) return false;
  *event = std::move(events_.front());
  events_.pop_front();
  return true;
}

void OpenStreams::Add() {
  std::lock_guard<std::mutex> lock(mu_);
  ++open_;
}

void OpenStreams::Remove() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    --open_;
  }
  cv_.notify_all();
}

StreamHold::StreamHold(OpenStreams* open) : open_(open) { open_->Add(); }
StreamHold::~StreamHold() { open_->Remove(); }

bool OpenStreams::WaitNone(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_for(lock, timeout, [&] { return open_ == 0; });
}

void SendError(const ApiError& error, httplib::Response* res) {
  res->status = error.http_status;
  res->set_content(ErrorJson(error), "application/json");
}

void HandleGeneration(const GenerationContext& ctx, Endpoint endpoint, const httplib::Request& req,
                      httplib::Response* res) {
  ApiRequest r;
  if (auto e = ParseApiRequest(&r, endpoint, req.body)) return SendError(*e, res);
  std::vector<int32_t> ids;
  if (auto e = PromptTokens(ctx, r, &ids)) return SendError(*e, res);
  const RequestLimits limits{ctx.options->max_prompt_tokens, ctx.options->max_tokens,
                             ctx.engine->max_model_len()};
  if (auto e = CheckLengths(&r, static_cast<int64_t>(ids.size()), limits)) {
    return SendError(*e, res);
  }

  // A stream counts as open from here (before Submit) until httplib releases its response, so
  // HttpServer::Stop, which sets `stopping` before it waits, either sees it open or is seen here.
  std::shared_ptr<StreamHold> hold;
  if (r.stream) hold = std::make_shared<StreamHold>(ctx.open_streams);
  if (ctx.stopping->load()) {
    return SendError({503, "the server is shutting down", "server_shutdown", "", ""}, res);
  }
  auto g = std::make_shared<Generation>();
  const uint64_t n = ctx.next_response_id->fetch_add(1);
  g->meta = ResponseMeta{endpoint,
                         StrCat(endpoint == Endpoint::kChat ? "chatcmpl-" : "cmpl-", n),
                         static_cast<int64_t>(std::time(nullptr)),
                         r.model,
                         r.logprobs,
                         r.include_usage};
  GenerationRequest request{r.model, std::move(ids), r.sampling};
  StatusOr<RequestId> id =
      ctx.engine->Submit(std::move(request), [g](const TokenEvent& e) { g->events.Push(e); });
  if (!id.ok()) {
    const bool model_error = id.status().code() == StatusCode::kNotFound;
    return SendError(ErrorFromStatus(id.status(), model_error ? "model" : ""), res);
  }
  g->id = *id;
  if (!r.stream) return RespondWhole(ctx, std::move(g), res);

  res->status = 200;
  res->set_header("Cache-Control", "no-cache");
  Engine* engine = ctx.engine;
  res->set_chunked_content_provider(
      "text/event-stream",
      [ctx, g](size_t /*offset*/, httplib::DataSink& sink) {
        return WriteStream(ctx, g.get(), sink);
      },
      [engine, g, hold](bool success) {
        if (!success) engine->Cancel(g->id);  // never started or the client went away
      });
}

}  // namespace tandem::serve::internal
