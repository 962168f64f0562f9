// HttpServer: the OpenAI-compatible HTTP API of `tandem serve` in front of an Engine.
//
// Endpoints: POST /v1/completions, POST /v1/chat/completions (JSON or SSE streaming), GET
// /v1/models, POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM bodies), GET /health,
// GET /metrics (Prometheus text), and fine-tuning jobs (POST/GET /v1/fine_tuning/jobs, GET
// /v1/fine_tuning/jobs/{id}, POST /v1/fine_tuning/jobs/{id}/cancel; serve/finetune.h). Errors
// are OpenAI error objects. With an API key, every /v1/ endpoint needs `Authorization: Bearer
// KEY`; /health and /metrics stay open.
//
//   TANDEM_ASSIGN_OR_RETURN(auto server, HttpServer::Create(engine.get(), options));
//   std::printf("listening on http://%s:%d\n", options.host.c_str(), server->port());
//   TANDEM_RETURN_IF_ERROR(server->Start());
//   ...
//   server->Stop();  // ends open streams (their requests are cancelled), joins the threads
//
// Ownership: the server borrows the Engine, which must outlive it (call Stop first).
// Thread-safety: Start and Stop from one controlling thread; requests are served on a pool of
// `num_threads` threads, each streaming response holding one thread while it runs.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "serve/engine.h"

namespace tandem::serve {

struct HttpServerOptions {
  std::string host = "127.0.0.1";  // loopback unless asked otherwise
  int port = 8000;                 // 0: any free port (see HttpServer::port())
  std::string api_key;             // empty: no authentication
  // /v1/load_lora_adapter accepts only paths that resolve (realpath) inside one of these.
  std::vector<std::string> adapter_dirs;
  // POST /v1/fine_tuning/jobs reads training files only from inside these (realpath); none:
  // fine-tuning jobs are refused.
  std::vector<std::string> finetune_dirs;
  int64_t max_body_bytes = 4 << 20;  // larger bodies get 413
  int64_t max_prompt_tokens = 0;     // 0: only the model's context limits the prompt
  int64_t max_tokens = 0;            // largest max_tokens accepted; 0: the model's context
  int num_threads = 64;              // concurrent connections served
  // Jinja chat template (tokenizer_config.json's chat_template); empty: ChatTemplate::Fallback.
  std::string chat_template;
};

class HttpServer {
 public:
  // Parses the chat template and binds the socket (so port() is known before Start).
  static StatusOr<std::unique_ptr<HttpServer>> Create(Engine* engine,
                                                      const HttpServerOptions& options);
  virtual ~HttpServer() = default;

  // The bound port (the one picked when options.port was 0).
  virtual int port() const = 0;
  // Serves on a background thread until Stop. Sets SIGPIPE to ignored for the process: a write
  // to a client that went away must fail (and cancel its request), not kill the server.
  virtual Status Start() = 0;
  // Stops accepting, cancels the engine requests of open streams and joins. Idempotent.
  virtual void Stop() = 0;
};

}  // namespace tandem::serve
