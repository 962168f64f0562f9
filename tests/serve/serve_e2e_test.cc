// `tandem serve` end to end: the real binary on a free loopback port with a tiny random model and
// a LoRA adapter, queried with curl and an HTTP client. Greedy outputs must equal a greedy loop
// over LlamaModel::Logits (with the adapter attached for the adapter's requests).
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "model/llama.h"
#include "model/tokenizer.h"
#include "ops/context.h"
#include "peft/adapter_io.h"
#include "peft/adapter_set.h"
#include "peft/lora.h"
#include "serve/internal/openai_protocol.h"
#include "tests/common/testing.h"
#include "tests/serve/serve_test_util.h"

namespace tandem::serve {
namespace {

using nlohmann::json;
using tandem::testing::TempDir;

model::LlamaConfig TinyConfig() {
  model::LlamaConfig c;
  c.vocab_size = 259;  // the byte tokenizer's
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.rope_theta = 100.0;
  c.rms_norm_eps = 1e-5;
  c.max_position_embeddings = 64;
  return c;
}

// The `tandem` binary beside this test's build tree (bin/ next to tests/).
std::string TandemBinary() {
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  return (exe.parent_path().parent_path() / "bin" / "tandem").string();
}

// `tandem serve ...` as a child process whose stdout we read for the listening line.
class ServeProcess {
 public:
  ~ServeProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (out_fd_ >= 0) close(out_fd_);
  }

  // Starts the server; returns its port, or -1 (with `log` holding its output) on failure.
  int Start(const std::vector<std::string>& args, std::string* log) {
    int fds[2];
    if (pipe(fds) != 0) return -1;
    pid_ = fork();
    if (pid_ == 0) {
      dup2(fds[1], STDOUT_FILENO);
      dup2(fds[1], STDERR_FILENO);
      close(fds[0]);
      std::vector<char*> argv;
      for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    close(fds[1]);
    out_fd_ = fds[0];
    const std::string marker = "listening on http://127.0.0.1:";
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (std::chrono::steady_clock::now() < deadline) {
      pollfd p{out_fd_, POLLIN, 0};
      if (poll(&p, 1, 200) <= 0) continue;
      char buf[512];
      const ssize_t n = read(out_fd_, buf, sizeof(buf));
      if (n <= 0) return -1;  // exited
      log->append(buf, static_cast<size_t>(n));
      const size_t at = log->find(marker);
      if (at != std::string::npos && log->find('\n', at) != std::string::npos) {
        return std::stoi(log->substr(at + marker.size()));
      }
    }
    return -1;
  }

  // SIGTERM, then the exit status (-1 if it did not exit within 15 s).
  int Terminate() {
    kill(pid_, SIGTERM);
    for (int i = 0; i < 150; ++i) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return -1;
  }

 private:
  pid_t pid_ = -1;
  int out_fd_ = -1;
};

// Runs curl and returns what it printed (body, then "\n<status>" from -w).
std::string Curl(int port, const std::string& path, const std::string& body = "") {
  std::string cmd =
      "curl -s -S -N --max-time 60 -w '\\n%{http_code}' http://127.0.0.1:" + std::to_string(port) +
      path;
  if (!body.empty()) cmd += " -H 'Content-Type: application/json' -d '" + body + "'";
  std::FILE* f = popen(cmd.c_str(), "r");
  if (f == nullptr) return "";
  std::string out;
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof(buf), f)) > 0;) out.append(buf, n);
  pclose(f);
  return out;
}

// Splits curl's output into (body, status).
std::pair<std::string, int> BodyAndStatus(const std::string& out) {
  const size_t nl = out.rfind('\n');
  if (nl == std::string::npos) return {out, 0};
  return {out.substr(0, nl), std::atoi(out.c_str() + nl + 1)};
}

// The token strings a completion's logprobs report for `ids` (invalid UTF-8 replaced, as the
// server's JSON writer does).
json TokenStrings(const model::Tokenizer& tok, const std::vector<int32_t>& ids) {
  json out = json::array();
  for (int32_t id : ids) {
    out.push_back(
        json::parse(internal::DumpJson(json(tok.Decode(std::span<const int32_t>(&id, 1))))));
  }
  return out;
}

// A flag value out of range stops `tandem serve` before it loads anything, with exit status 2
// and the flag named.
TEST(ServeEndToEnd, RefusesABadCudaGraphsValue) {
  const std::string tandem = TandemBinary();
  ASSERT_TRUE(std::filesystem::exists(tandem)) << tandem << " is missing: build the tandem target";
  const std::string cmd = tandem + " serve --model /nonexistent --cuda-graphs 2 2>&1";
  std::FILE* f = popen(cmd.c_str(), "r");
  ASSERT_NE(f, nullptr);
  std::string out;
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof(buf), f)) > 0;) out.append(buf, n);
  const int status = pclose(f);
  ASSERT_TRUE(WIFEXITED(status)) << out;
  EXPECT_EQ(WEXITSTATUS(status), 2) << out;
  EXPECT_NE(out.find("--cuda-graphs: '2' is not a valid value"), std::string::npos) << out;
}

TEST(ServeEndToEnd, ServesBaseAndAdapterOverHttp) {
  const std::string tandem = TandemBinary();
  ASSERT_TRUE(std::filesystem::exists(tandem)) << tandem << " is missing: build the tandem target";
  TempDir dir;
  auto ctx = std::move(ops::Context::ForDevice(Device::Cpu())).value();
  model::ModelOptions mo;
  mo.trainable = false;
  auto llama = std::move(model::LlamaModel::Create(*ctx, TinyConfig(), mo)).value();
  TANDEM_CHECK_OK(llama->InitRandom(/*seed=*/91, /*std=*/0.5f));
  TANDEM_CHECK_OK(llama->SaveSafetensors(dir.Join("tiny"), DType::kF32));
  peft::LoraConfig lc;
  lc.r = 4;
  lc.alpha = 8.0;
  lc.target_modules = {"all-linear"};
  auto adapter = std::move(peft::LoraAdapter::Create(*ctx, TinyConfig(), lc)).value();
  for (size_t i = 0; i < adapter->parameters().size(); ++i) {
    TANDEM_CHECK_OK(adapter->SetFromHost(
        i, testing::RandomUniform(adapter->parameters()[i].weight.shape(), 300 + i, -0.5f, 0.5f)));
  }
  TANDEM_CHECK_OK(peft::SaveLoraAdapter(*adapter, dir.Join("adapters/ad")));
  TANDEM_CHECK_OK(peft::SaveLoraAdapter(*adapter, dir.Join("adapters/ad2")));
  std::filesystem::create_directories(dir.Join("outside"));

  auto tok = model::MakeByteTokenizer();
  std::vector<int32_t> prompt = {256};
  for (char c : std::string("Hi there")) prompt.push_back(static_cast<unsigned char>(c));
  // The chat prompt is the fallback template's (the model directory has no chat template).
  const std::vector<int32_t> chat_prompt = tok->Encode("<bos>user: Hi there\nassistant: ");
  const int64_t V = llama->config().vocab_size;  // greedy over every id
  const std::vector<int32_t> base_ids = test_util::GreedyTokens(*llama, prompt, 8, V);
  const std::vector<int32_t> base_chat_ids = test_util::GreedyTokens(*llama, chat_prompt, 8, V);
  std::vector<int32_t> adapter_ids, adapter_chat_ids;
  {
    peft::AdapterSet set(*ctx, TinyConfig());
    ASSERT_EQ(*set.Add(std::move(adapter)), 0);
    llama->SetAdapter(&set);
    adapter_ids = test_util::GreedyTokens(*llama, prompt, 8, V);
    adapter_chat_ids = test_util::GreedyTokens(*llama, chat_prompt, 8, V);
    llama->SetAdapter(nullptr);
  }
  ASSERT_NE(base_ids, adapter_ids) << "the adapter should change the greedy continuation";

  ServeProcess server;
  std::string log;
  const int port =
      server.Start({tandem, "serve", "--model", dir.Join("tiny"), "--name", "tiny", "--adapter",
                    "ad=" + dir.Join("adapters/ad"), "--adapter-dir", dir.Join("adapters"),
                    "--device", "cpu", "--port", "0", "--pool-bytes", "8388608", "--threads", "8",
                    "--cuda-graphs", "1"},
                   &log);
  ASSERT_GT(port, 0) << "tandem serve did not start:\n" << log;

  EXPECT_EQ(BodyAndStatus(Curl(port, "/health")).second, 200);
  auto [models_body, models_status] = BodyAndStatus(Curl(port, "/v1/models"));
  ASSERT_EQ(models_status, 200) << models_body;
  json models = json::parse(models_body);
  ASSERT_EQ(models["data"].size(), 2u) << models_body;
  EXPECT_EQ(models["data"][0]["id"], "tiny");

  for (const auto& [model, expected] :
       {std::pair{"tiny", base_ids}, std::pair{"ad", adapter_ids}}) {
    json body = {{"model", model},   {"prompt", "Hi there"}, {"max_tokens", 8},
                 {"temperature", 0}, {"ignore_eos", true},   {"logprobs", 0}};
    auto [text, status] = BodyAndStatus(Curl(port, "/v1/completions", body.dump()));
    ASSERT_EQ(status, 200) << text;
    json r = json::parse(text);
    EXPECT_EQ(r["choices"][0]["logprobs"]["tokens"], TokenStrings(*tok, expected)) << model;
    EXPECT_EQ(r["choices"][0]["finish_reason"], "length");
    EXPECT_EQ(r["usage"]["prompt_tokens"], 9);
    EXPECT_EQ(r["usage"]["completion_tokens"], 8);
  }

  // Chat logprobs carry each token's exact bytes: a check that survives invalid UTF-8.
  for (const auto& [model, expected] :
       {std::pair{"tiny", base_chat_ids}, std::pair{"ad", adapter_chat_ids}}) {
    json body = {{"model", model},     {"messages", {{{"role", "user"}, {"content", "Hi there"}}}},
                 {"max_tokens", 8},    {"temperature", 0},
                 {"ignore_eos", true}, {"logprobs", true}};
    auto [text, status] = BodyAndStatus(Curl(port, "/v1/chat/completions", body.dump()));
    ASSERT_EQ(status, 200) << text;
    json r = json::parse(text);
    EXPECT_EQ(r["usage"]["prompt_tokens"], chat_prompt.size());
    const json& content = r["choices"][0]["logprobs"]["content"];
    ASSERT_EQ(content.size(), expected.size()) << text;
    for (size_t i = 0; i < expected.size(); ++i) {
      const std::string s = tok->Decode(std::span<const int32_t>(&expected[i], 1));
      json bytes = json::array();
      for (unsigned char c : s) bytes.push_back(static_cast<int>(c));
      EXPECT_EQ(content[i]["bytes"], bytes)
          << model << " token " << i << ": expected id " << expected[i];
    }
  }

  json chat = {{"model", "ad"},
               {"messages", {{{"role", "user"}, {"content", "Hi"}}}},
               {"max_tokens", 4},
               {"stream", true},
               {"stream_options", {{"include_usage", true}}}};
  auto [stream, stream_status] = BodyAndStatus(Curl(port, "/v1/chat/completions", chat.dump()));
  EXPECT_EQ(stream_status, 200);
  EXPECT_EQ(stream.rfind("data: {", 0), 0u) << stream;
  EXPECT_NE(stream.find("\"delta\":{\"role\":\"assistant\",\"content\":\"\"}"), std::string::npos);
  EXPECT_NE(stream.find("\"usage\":{\"prompt_tokens\":"), std::string::npos) << stream;
  EXPECT_TRUE(stream.size() >= 14 && stream.substr(stream.size() - 14) == "data: [DONE]\n\n")
      << stream;

  json load = {{"lora_name", "ad2"}, {"lora_path", dir.Join("adapters/ad2")}};
  EXPECT_EQ(BodyAndStatus(Curl(port, "/v1/load_lora_adapter", load.dump())).second, 200);
  load = {{"lora_name", "evil"}, {"lora_path", dir.Join("adapters/../outside")}};
  EXPECT_EQ(BodyAndStatus(Curl(port, "/v1/load_lora_adapter", load.dump())).second, 400);
  json again = {{"model", "ad2"},   {"prompt", "Hi there"}, {"max_tokens", 8},
                {"temperature", 0}, {"ignore_eos", true},   {"logprobs", 0}};
  auto [again_text, again_status] = BodyAndStatus(Curl(port, "/v1/completions", again.dump()));
  ASSERT_EQ(again_status, 200) << again_text;
  EXPECT_EQ(json::parse(again_text)["choices"][0]["logprobs"]["tokens"],
            TokenStrings(*tok, adapter_ids));
  EXPECT_EQ(BodyAndStatus(Curl(port, "/v1/completions", R"({"model":"nope","prompt":"x"})")).second,
            404);

  EXPECT_EQ(server.Terminate(), 0) << "tandem serve did not shut down cleanly";
}

}  // namespace
}  // namespace tandem::serve
