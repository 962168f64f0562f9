// The completion and chat handlers of HttpServer: request -> prompt tokens -> Engine::Submit ->
// events -> one JSON response or an SSE stream.
//
// Events cross from the engine thread to the HTTP thread through an EventQueue (the engine's
// callback only pushes). A streaming response whose client goes away (a failed write) cancels its
// engine request; so does HttpServer::Stop through `stopping`, which first waits (OpenStreams) for
// every stream to write its end: a stream whose chunked writer httplib has not started yet would
// otherwise be dropped without its abort chunk and without cancelling its request.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <string>

#include "serve/chat_template.h"
#include "serve/engine.h"
#include "serve/http_server.h"
#include "serve/internal/http_lib.h"
#include "serve/internal/openai_protocol.h"
#include "serve/metrics.h"

namespace tandem::serve::internal {

// A FIFO of engine events, filled on the engine thread and drained on an HTTP thread.
class EventQueue {
 public:
  void Push(const TokenEvent& event);
  // Waits up to `timeout` for an event; false when none came.
  bool Pop(TokenEvent* event, std::chrono::milliseconds timeout);

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<TokenEvent> events_;
};

// The streaming responses httplib has not finished with (counted from the handler until the
// response's resource releaser runs).
class OpenStreams {
 public:
  void Add();
  void Remove();
  // Waits until none is open or `timeout` passes; false on timeout.
  bool WaitNone(std::chrono::milliseconds timeout);

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int64_t open_ = 0;
};

// Counts one stream as open for its lifetime.
class StreamHold {
 public:
  explicit StreamHold(OpenStreams* open);
  ~StreamHold();
  StreamHold(const StreamHold&) = delete;
  StreamHold& operator=(const StreamHold&) = delete;

 private:
  OpenStreams* open_;
};

// What the handlers share; owned by the server, alive while it serves.
struct GenerationContext {
  Engine* engine = nullptr;
  const HttpServerOptions* options = nullptr;
  const ChatTemplate* chat_template = nullptr;
  std::string bos_token;  // the tokenizer's BOS/EOS strings, for the chat template
  std::string eos_token;
  ServerMetrics* metrics = nullptr;
  const std::atomic<bool>* stopping = nullptr;
  OpenStreams* open_streams = nullptr;
  std::atomic<uint64_t>* next_response_id = nullptr;
};

// Sends `error` as an OpenAI error object with its status.
void SendError(const ApiError& error, httplib::Response* res);

// POST /v1/completions and /v1/chat/completions.
void HandleGeneration(const GenerationContext& ctx, Endpoint endpoint, const httplib::Request& req,
                      httplib::Response* res);

}  // namespace tandem::serve::internal
