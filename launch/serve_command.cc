// `tandem serve`: the OpenAI-compatible HTTP server over a model and its LoRA adapters.
#include <pthread.h>
#include <signal.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

#include "launch/commands.h"
#include "serve/chat_template.h"
#include "serve/engine.h"
#include "serve/http_server.h"

namespace tandem::launch {
namespace {

void PrintServeHelp() {
  std::printf(
      "usage: tandem serve --model DIR [options]\n\n"
      "Serves the model and its LoRA adapters over an OpenAI-compatible HTTP API\n"
      "(/v1/completions, /v1/chat/completions, /v1/models, /v1/load_lora_adapter,\n"
      "/v1/unload_lora_adapter, /health, /metrics). Prints \"listening on http://HOST:PORT\"\n"
      "once ready; SIGINT or SIGTERM stop it cleanly.\n\n"
      "options:\n"
      "  --model DIR            config.json + safetensors + tokenizer.json\n"
      "  --name NAME            the base model's name in requests (default: the directory's)\n"
      "  --adapter NAME=DIR     a PEFT LoRA adapter to load at start (repeatable)\n"
      "  --adapter-dir DIR      where /v1/load_lora_adapter may load from (repeatable; none:\n"
      "                         runtime loading is refused)\n"
      "  --device D             auto, cpu, cuda or cuda:N (default auto)\n"
      "  --host H               address to bind (default 127.0.0.1)\n"
      "  --port N               port (default 8000; 0 picks a free one)\n"
      "  --api-key K            require 'Authorization: Bearer K' on /v1/ (default: none;\n"
      "                         also read from $TANDEM_API_KEY)\n"
      "  --chat-template FILE   Jinja chat template (default: the model's tokenizer_config.json)\n"
      "  --max-body-bytes N     larger request bodies get 413 (default 4194304)\n"
      "  --max-prompt-tokens N  longer prompts get 400 (default 0: the model's context)\n"
      "  --max-tokens N         largest max_tokens accepted (default 0: the model's context)\n"
      "  --max-model-len N      prompt + completion tokens (default 0: the model's maximum)\n"
      "  --pool-bytes N         unified KV/adapter pool size (default 0: a share of free memory)\n"
      "  --max-batch-tokens N   tokens per engine iteration (default 2048)\n"
      "  --max-running N        requests in the running batch (default 256)\n"
      "  --max-waiting N        queued requests before 503 (default 1024)\n"
      "  --cuda-graphs 0|1      replay decode batches as CUDA graphs (default 1)\n"
      "  --threads N            HTTP connections served at once (default 64)\n"
      "\nfine-tuning jobs (POST /v1/fine_tuning/jobs; trained in the token budget inference\n"
      "leaves over, published as NAME@VERSION):\n"
      "  --finetune-dir DIR     where training files may be read from (repeatable; none:\n"
      "                         fine-tuning jobs are refused)\n"
      "  --finetune-output-dir DIR  where versions are written as NAME-vN (default: the first\n"
      "                         --adapter-dir)\n"
      "  --finetune-state-dir DIR   job snapshots; unfinished jobs there resume at start\n"
      "  --finetune-micro-batch-tokens N  padded tokens per forward+backward (default 1024)\n"
      "  --finetune-snapshot-steps N      snapshot every N optimizer steps (default 10)\n"
      "  --finetune-busy-units N   while serving, at most N forward/backward units (a block's\n"
      "                            forward or half its backward) of fine-tuning per iteration, "
      "run\n"
      "                            beside inference at a lower priority; 0 = no limit (default "
      "1)\n"
      "  --finetune-busy-sms N     GPU: while serving, fine-tuning kernels run on N SMs set\n"
      "                            apart (a green context) and decode keeps the rest; 0 = none\n"
      "                            (default)\n");
}

int UsageError(const std::string& message) {
  std::fprintf(stderr, "tandem serve: %s (see tandem serve --help)\n", message.c_str());
  return 2;
}

bool ParseInt(const std::string& text, int64_t* out) {
  try {
    size_t used = 0;
    *out = std::stoll(text, &used);
    return used == text.size() && *out >= 0;
  } catch (const std::exception&) {
    return false;
  }
}

struct ServeOptions {
  serve::EngineOptions engine;
  serve::HttpServerOptions http;
  std::string chat_template_file;
};

// Applies one "--flag value"; returns an error message, "" when fine.
std::string ApplyFlag(const std::string& flag, const std::string& value, ServeOptions* o) {
  const std::pair<const char*, std::string*> text_flags[] = {
      {"--model", &o->engine.model_dir}, {"--name", &o->engine.model_name},
      {"--device", &o->engine.device},   {"--host", &o->http.host},
      {"--api-key", &o->http.api_key},   {"--chat-template", &o->chat_template_file},
      {"--finetune-output-dir", &o->engine.finetune.publish_dir},
      {"--finetune-state-dir", &o->engine.finetune.state_dir}};
  for (const auto& [name, field] : text_flags) {
    if (flag == name) {
      *field = value;
      return "";
    }
  }
  if (flag == "--adapter") {
    const size_t eq = value.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == value.size()) {
      return "--adapter wants NAME=DIR, found '" + value + "'";
    }
    o->engine.adapters.emplace_back(value.substr(0, eq), value.substr(eq + 1));
    return "";
  }
  if (flag == "--adapter-dir") {
    o->http.adapter_dirs.push_back(value);
    return "";
  }
  if (flag == "--finetune-dir") {
    o->http.finetune_dirs.push_back(value);
    return "";
  }
  int64_t n = 0;
  const std::pair<const char*, int64_t*> int_flags[] = {
      {"--max-body-bytes", &o->http.max_body_bytes},
      {"--max-prompt-tokens", &o->http.max_prompt_tokens},
      {"--max-tokens", &o->http.max_tokens},
      {"--max-model-len", &o->engine.max_model_len},
      {"--pool-bytes", &o->engine.pool_bytes},
      {"--max-batch-tokens", &o->engine.max_batch_tokens},
      {"--max-running", &o->engine.max_running},
      {"--max-waiting", &o->engine.max_waiting},
      {"--finetune-micro-batch-tokens", &o->engine.finetune.micro_batch_tokens},
      {"--finetune-busy-units", &o->engine.finetune.busy_units},
      {"--finetune-busy-sms", &o->engine.finetune.busy_sms},
      {"--finetune-snapshot-steps", &o->engine.finetune.snapshot_every_steps}};
  const bool is_port = flag == "--port", is_threads = flag == "--threads";
  const bool is_graphs = flag == "--cuda-graphs";
  bool known = is_port || is_threads || is_graphs;
  for (const auto& [name, field] : int_flags) known = known || flag == name;
  if (!known) return "unexpected argument '" + flag + "'";
  if (!ParseInt(value, &n) || (is_port && n > 65535) || (is_threads && (n < 1 || n > 4096)) ||
      (is_graphs && n > 1)) {
    return flag + ": '" + value + "' is not a valid value";
  }
  if (is_port) o->http.port = static_cast<int>(n);
  if (is_threads) o->http.num_threads = static_cast<int>(n);
  if (is_graphs) o->engine.cuda_graphs = n == 1;
  for (const auto& [name, field] : int_flags) {
    if (flag == name) *field = n;
  }
  return "";
}

std::string ParseArgs(const Args& args, ServeOptions* o, bool* help) {
  if (const char* key = std::getenv("TANDEM_API_KEY")) o->http.api_key = key;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--help" || args[i] == "-h") {
      *help = true;
      return "";
    }
    if (i + 1 >= args.size()) return "unexpected argument '" + args[i] + "' (or it lacks a value)";
    std::string error = ApplyFlag(args[i], args[i + 1], o);
    if (!error.empty()) return error;
    ++i;
  }
  if (o->engine.model_dir.empty()) return "--model DIR is required";
  if (o->engine.finetune.publish_dir.empty() && !o->http.finetune_dirs.empty() &&
      !o->http.adapter_dirs.empty()) {
    o->engine.finetune.publish_dir = o->http.adapter_dirs.front();
  }
  return "";
}

StatusOr<std::string> ChatTemplateSource(const ServeOptions& o) {
  if (!o.chat_template_file.empty()) {
    std::FILE* f = std::fopen(o.chat_template_file.c_str(), "rb");
    if (f == nullptr) return NotFoundError("cannot open --chat-template " + o.chat_template_file);
    std::string text;
    char buf[4096];
    for (size_t n; (n = std::fread(buf, 1, sizeof(buf), f)) > 0;) text.append(buf, n);
    std::fclose(f);
    return text;
  }
  StatusOr<std::string> source = serve::ReadChatTemplate(o.engine.model_dir);
  if (source.status().code() == StatusCode::kNotFound) {
    std::fprintf(stderr,
                 "tandem serve: %s; /v1/chat/completions uses the plain fallback template\n",
                 source.status().message().c_str());
    return std::string();
  }
  return source;
}

// Blocks SIGINT and SIGTERM in this thread (and so in every thread started after), so that
// WaitForSignal receives them instead of the default handler killing the process mid-request.
sigset_t BlockStopSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  return set;
}

Status Serve(ServeOptions o) {
  const sigset_t stop_signals = BlockStopSignals();
  TANDEM_ASSIGN_OR_RETURN(o.http.chat_template, ChatTemplateSource(o));
  TANDEM_ASSIGN_OR_RETURN(std::unique_ptr<serve::Engine> engine, serve::Engine::Create(o.engine));
  TANDEM_ASSIGN_OR_RETURN(std::unique_ptr<serve::HttpServer> server,
                          serve::HttpServer::Create(engine.get(), o.http));
  TANDEM_RETURN_IF_ERROR(server->Start());
  std::printf("listening on http://%s:%d\n", o.http.host.c_str(), server->port());
  std::fflush(stdout);
  int signal_number = 0;
  sigwait(&stop_signals, &signal_number);
  std::fprintf(stderr, "tandem serve: %s received, shutting down\n",
               signal_number == SIGINT ? "SIGINT" : "SIGTERM");
  server->Stop();
  engine->Shutdown();
  return Status::Ok();
}

}  // namespace

int ServeCommand(const Args& args) {
  ServeOptions options;
  bool help = false;
  const std::string usage_error = ParseArgs(args, &options, &help);
  if (help) {
    PrintServeHelp();
    return 0;
  }
  if (!usage_error.empty()) return UsageError(usage_error);
  Status s = Serve(std::move(options));
  if (!s.ok()) {
    std::fprintf(stderr, "tandem serve: %s\n", s.message().c_str());
    return 1;
  }
  return 0;
}

}  // namespace tandem::launch
