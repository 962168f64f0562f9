#include "serve/http_server.h"

#include <limits.h>
#include <stdlib.h>
#include <sys/socket.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <ctime>
#include <nlohmann/json.hpp>
#include <span>
#include <thread>
#include <utility>

#include "serve/chat_template.h"
#include "serve/internal/http_finetune.h"
#include "serve/internal/http_generation.h"
#include "serve/internal/http_lib.h"
#include "serve/internal/openai_protocol.h"
#include "serve/metrics.h"

namespace tandem::serve {
namespace {

using internal::ApiError;
using internal::BadRequest;
using internal::SendError;
using nlohmann::json;

// Compares without an early exit, so the time taken does not reveal the matching prefix.
bool ConstantTimeEquals(const std::string& a, const std::string& b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size(); ++i) diff |= a[i] ^ (i < b.size() ? b[i] : 0);
  return diff == 0;
}

StatusOr<std::string> RealPath(const std::string& path) {
  char buf[PATH_MAX];
  if (::realpath(path.c_str(), buf) == nullptr) {
    return NotFoundError(StrCat("'", path, "' does not resolve: ", std::strerror(errno)));
  }
  return std::string(buf);
}

std::string TokenString(const model::Tokenizer& tok, std::optional<int32_t> id) {
  if (!id) return "";
  return tok.Decode(std::span<const int32_t>(&*id, 1));
}

class HttpServerImpl : public HttpServer {
 public:
  HttpServerImpl(Engine* engine, HttpServerOptions options, ChatTemplate chat_template)
      : engine_(engine), options_(std::move(options)), template_(std::move(chat_template)) {
    const model::Tokenizer& tok = engine_->tokenizer();
    ctx_ = {engine_,
            &options_,
            &template_,
            TokenString(tok, tok.bos_id()),
            TokenString(tok, tok.eos_id()),
            &metrics_,
            &stopping_,
            &open_streams_,
            &next_response_id_};
    ft_ctx_ = {engine_, options_.finetune_dirs, &template_};
  }
  ~HttpServerImpl() override { Stop(); }

  Status Bind();
  int port() const override { return port_; }
  Status Start() override;
  void Stop() override;

 private:
  void Route();
  bool Authorized(const httplib::Request& req, httplib::Response& res);
  void Models(httplib::Response& res);
  void LoadAdapter(const httplib::Request& req, httplib::Response& res);
  void UnloadAdapter(const httplib::Request& req, httplib::Response& res);
  std::optional<ApiError> CheckAdapterPath(const std::string& path, std::string* resolved);

  Engine* engine_;
  HttpServerOptions options_;
  ChatTemplate template_;
  ServerMetrics metrics_;
  std::atomic<bool> stopping_{false};
  internal::OpenStreams open_streams_;
  std::atomic<uint64_t> next_response_id_{1};
  internal::GenerationContext ctx_;
  internal::FineTuneHttpContext ft_ctx_;
  httplib::Server server_;
  int port_ = -1;
  int listen_fd_ = -1;  // owned by server_
  std::thread thread_;
};

Status HttpServerImpl::Bind() {
  Route();
  const int n = options_.num_threads;
  server_.new_task_queue = [n] { return new httplib::ThreadPool(static_cast<size_t>(n)); };
  server_.set_payload_max_length(static_cast<size_t>(options_.max_body_bytes));
  server_.set_keep_alive_timeout(2);
  // httplib listens with a backlog of 5, so a burst of clients overflows the accept queue and
  // some of them fail; remember the listening socket to deepen the queue after binding.
  server_.set_socket_options([this](socket_t sock) {
    httplib::default_socket_options(sock);
    if (listen_fd_ < 0) listen_fd_ = sock;
  });
  port_ = options_.port == 0
              ? server_.bind_to_any_port(options_.host)
              : (server_.bind_to_port(options_.host, options_.port) ? options_.port : -1);
  if (port_ < 0) {
    return UnavailableError(StrCat("cannot listen on ", options_.host, ":", options_.port,
                                   " (address in use or not local?)"));
  }
  if (listen_fd_ >= 0 && ::listen(listen_fd_, SOMAXCONN) != 0) {
    return InternalError(StrCat("listen(", options_.host, ":", port_, "): ", std::strerror(errno)));
  }
  return Status::Ok();
}

bool HttpServerImpl::Authorized(const httplib::Request& req, httplib::Response& res) {
  if (options_.api_key.empty() || req.path.rfind("/v1/", 0) != 0) return true;
  const std::string got = req.get_header_value("Authorization");
  if (ConstantTimeEquals(got, "Bearer " + options_.api_key)) return true;
  SendError({401,
             got.empty() ? "missing API key: send 'Authorization: Bearer KEY'"
                         : "incorrect API key in the Authorization header",
             "invalid_request_error", "", "invalid_api_key"},
            &res);
  return false;
}

void HttpServerImpl::Route() {
  using httplib::Request;
  using httplib::Response;
  server_.set_pre_routing_handler([this](const Request& req, Response& res) {
    return Authorized(req, res) ? httplib::Server::HandlerResponse::Unhandled
                                : httplib::Server::HandlerResponse::Handled;
  });
  server_.Post("/v1/completions", [this](const Request& req, Response& res) {
    internal::HandleGeneration(ctx_, internal::Endpoint::kCompletions, req, &res);
  });
  server_.Post("/v1/chat/completions", [this](const Request& req, Response& res) {
    internal::HandleGeneration(ctx_, internal::Endpoint::kChat, req, &res);
  });
  server_.Get("/v1/models", [this](const Request&, Response& res) { Models(res); });
  server_.Post("/v1/load_lora_adapter",
               [this](const Request& req, Response& res) { LoadAdapter(req, res); });
  server_.Post("/v1/unload_lora_adapter",
               [this](const Request& req, Response& res) { UnloadAdapter(req, res); });
  server_.Post("/v1/fine_tuning/jobs", [this](const Request& req, Response& res) {
    internal::HandleCreateFineTuneJob(ft_ctx_, req, &res);
  });
  server_.Get("/v1/fine_tuning/jobs", [this](const Request&, Response& res) {
    internal::HandleListFineTuneJobs(ft_ctx_, &res);
  });
  server_.Get(R"(/v1/fine_tuning/jobs/([A-Za-z0-9_.-]+))",
              [this](const Request& req, Response& res) {
                internal::HandleGetFineTuneJob(ft_ctx_, req.matches[1], &res);
              });
  server_.Post(R"(/v1/fine_tuning/jobs/([A-Za-z0-9_.-]+)/cancel)",
               [this](const Request& req, Response& res) {
                 internal::HandleCancelFineTuneJob(ft_ctx_, req.matches[1], &res);
               });
  server_.Get("/health", [](const Request&, Response& res) {
    res.set_content("{\"status\":\"ok\"}", "application/json");
  });
  server_.Get("/metrics", [this](const Request&, Response& res) {
    res.set_content(metrics_.Render(engine_->Stats()), "text/plain; version=0.0.4");
  });
  // Errors httplib raises itself (unknown route, body too large, bad request line) get an
  // OpenAI error object; responses that already have a body keep it.
  server_.set_error_handler(
      httplib::Server::HandlerWithResponse([](const Request& req, Response& res) {
        if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
        std::string message = StrCat("HTTP ", res.status, " for ", req.method, " ", req.path);
        if (res.status == 404) message = StrCat("no such endpoint: ", req.method, " ", req.path);
        if (res.status == 413) message = "the request body is larger than the server's limit";
        SendError({res.status, message, "invalid_request_error", "", ""}, &res);
        return httplib::Server::HandlerResponse::Handled;
      }));
  server_.set_exception_handler([](const Request&, Response& res, std::exception_ptr ep) {
    std::string what = "unknown exception";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    SendError({500, "internal error: " + what, "internal_error", "", ""}, &res);
  });
  server_.set_logger(
      [this](const Request&, const Response& res) { metrics_.CountResponse(res.status); });
}

void HttpServerImpl::Models(httplib::Response& res) {
  json data = json::array();
  const int64_t created = static_cast<int64_t>(std::time(nullptr));
  for (const ModelInfo& m : engine_->Models()) {
    json entry = {{"id", m.id},
                  {"object", "model"},
                  {"created", created},
                  {"owned_by", "tandem"},
                  {"root", m.path},
                  {"parent", m.parent.empty() ? json(nullptr) : json(m.parent)},
                  {"max_model_len", engine_->max_model_len()}};
    data.push_back(std::move(entry));
  }
  res.set_content(internal::DumpJson(json{{"object", "list"}, {"data", data}}), "application/json");
}

std::optional<ApiError> HttpServerImpl::CheckAdapterPath(const std::string& path,
                                                         std::string* resolved) {
  if (options_.adapter_dirs.empty()) {
    return BadRequest("loading adapters is disabled: start `tandem serve` with --adapter-dir DIR",
                      "lora_path");
  }
  StatusOr<std::string> real = RealPath(path);
  if (!real.ok()) return BadRequest("lora_path " + real.status().message(), "lora_path");
  std::string dirs;
  for (const std::string& dir : options_.adapter_dirs) {
    StatusOr<std::string> root = RealPath(dir);
    if (!root.ok()) continue;
    if (*real == *root || real->rfind(*root + "/", 0) == 0) {
      *resolved = *real;
      return std::nullopt;
    }
    dirs += (dirs.empty() ? "" : ", ") + *root;
  }
  return BadRequest(StrCat("lora_path '", path, "' resolves to '", *real,
                           "', outside the adapter directories (", dirs, ")"),
                    "lora_path");
}

// Parses a JSON object body with the given required non-empty string fields.
std::optional<ApiError> ParseStrings(const std::string& body,
                                     std::initializer_list<const char*> fields,
                                     std::vector<std::string>* out) {
  json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return BadRequest("the body must be a JSON object");
  for (const char* f : fields) {
    auto it = j.find(f);
    if (it == j.end() || !it->is_string() || it->get<std::string>().empty()) {
      return BadRequest(StrCat("'", f, "' must be a non-empty string"), f);
    }
    out->push_back(it->get<std::string>());
  }
  return std::nullopt;
}

void HttpServerImpl::LoadAdapter(const httplib::Request& req, httplib::Response& res) {
  std::vector<std::string> v;
  if (auto e = ParseStrings(req.body, {"lora_name", "lora_path"}, &v)) return SendError(*e, &res);
  std::string resolved;
  if (auto e = CheckAdapterPath(v[1], &resolved)) return SendError(*e, &res);
  Status s = engine_->LoadAdapter(v[0], resolved);
  if (!s.ok()) {
    ApiError e = internal::ErrorFromStatus(s, "lora_path");
    if (e.http_status == 404) e.code = "";  // a missing file, not an unknown model
    return SendError(e, &res);
  }
  res.set_content(StrCat("Success: LoRA adapter '", v[0], "' added successfully."), "text/plain");
}

void HttpServerImpl::UnloadAdapter(const httplib::Request& req, httplib::Response& res) {
  std::vector<std::string> v;
  if (auto e = ParseStrings(req.body, {"lora_name"}, &v)) return SendError(*e, &res);
  Status s = engine_->UnloadAdapter(v[0]);
  if (!s.ok()) return SendError(internal::ErrorFromStatus(s, "lora_name"), &res);
  res.set_content(StrCat("Success: LoRA adapter '", v[0], "' removed successfully."), "text/plain");
}

Status HttpServerImpl::Start() {
  if (thread_.joinable()) return FailedPreconditionError("HttpServer::Start called twice");
  // A write to a client that went away must fail (and cancel its request), not kill the process.
  std::signal(SIGPIPE, SIG_IGN);
  thread_ = std::thread([this] { server_.listen_after_bind(); });
  return Status::Ok();
}

void HttpServerImpl::Stop() {
  stopping_.store(true);
  // Open streams see `stopping_` within a poll interval, cancel their requests and write their
  // abort chunk and [DONE]; httplib skips the writer of a response it has not begun once it
  // stops, so it stops after them. Bounded: a client that reads nothing fails its writes after
  // httplib's write timeout (5 s).
  open_streams_.WaitNone(std::chrono::seconds(15));
  server_.stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace

StatusOr<std::unique_ptr<HttpServer>> HttpServer::Create(Engine* engine,
                                                         const HttpServerOptions& options) {
  TANDEM_CHECK(engine != nullptr);
  if (options.num_threads < 1) {
    return InvalidArgumentError(StrCat("num_threads must be >= 1, found ", options.num_threads));
  }
  if (options.max_body_bytes < 1) {
    return InvalidArgumentError(
        StrCat("max_body_bytes must be >= 1, found ", options.max_body_bytes));
  }
  ChatTemplate chat_template = ChatTemplate::Fallback();
  if (!options.chat_template.empty()) {
    StatusOr<ChatTemplate> parsed = ChatTemplate::Parse(options.chat_template);
    if (!parsed.ok()) return parsed.status().WithContext("chat template");
    chat_template = std::move(*parsed);
  }
  auto server = std::make_unique<HttpServerImpl>(engine, options, std::move(chat_template));
  TANDEM_RETURN_IF_ERROR(server->Bind());
  return std::unique_ptr<HttpServer>(std::move(server));
}

}  // namespace tandem::serve
