// Co-serving end to end: the real `tandem serve` binary with --finetune-dir, --adapter-dir and
// --finetune-state-dir. A fine-tuning job created over HTTP trains and publishes "pairs@1"; the
// server is killed (SIGKILL) mid-job; a new server on the same directories serves "pairs@1" again
// and resumes the job from its snapshot; cancel; a clean SIGTERM exit.
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "model/llama.h"
#include "ops/context.h"
#include "serve/internal/http_lib.h"
#include "tests/common/testing.h"
#include "tests/serve/serve_test_util.h"

namespace tandem::serve {
namespace {

using nlohmann::json;
using tandem::testing::TempDir;

model::LlamaConfig TinyConfig() { return test_util::TinyServeConfig(259, 64); }

std::string TandemBinary() {
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  return (exe.parent_path().parent_path() / "bin" / "tandem").string();
}

// `tandem serve ...` as a child process; Start returns the port it listens on, or -1.
class ServeProcess {
 public:
  ~ServeProcess() { Kill(); }

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
      if (n <= 0) return -1;
      log->append(buf, static_cast<size_t>(n));
      const size_t at = log->find(marker);
      if (at != std::string::npos && log->find('\n', at) != std::string::npos) {
        return std::stoi(log->substr(at + marker.size()));
      }
    }
    return -1;
  }

  // As if the machine died: no shutdown path runs.
  void Kill() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
    if (out_fd_ >= 0) close(out_fd_);
    out_fd_ = -1;
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

json GetJson(int port, const std::string& path) {
  httplib::Client c("127.0.0.1", port);
  httplib::Result r = c.Get(path.c_str());
  if (!r) return {};
  EXPECT_EQ(r->status, 200) << path << ": " << r->body;
  return json::parse(r->body, nullptr, false);
}

httplib::Result PostJson(int port, const std::string& path, const json& body) {
  httplib::Client c("127.0.0.1", port);
  return c.Post(path.c_str(), body.dump(), "application/json");
}

// Polls the job until `done(job)` or 30 s pass; returns the last state seen.
template <typename Pred>
json PollJob(int port, const std::string& id, Pred done) {
  json job;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    job = GetJson(port, "/v1/fine_tuning/jobs/" + id);
    if (job.is_object() && done(job)) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return job;
}

TEST(CoserveE2eTest, JobTrainsPublishesSurvivesSigkillAndResumes) {
  ASSERT_TRUE(std::filesystem::exists(TandemBinary())) << TandemBinary();
  TempDir dir;
  auto ctx = ops::Context::Cpu();
  {
    model::ModelOptions o;
    o.trainable = false;
    auto model = std::move(model::LlamaModel::Create(*ctx, TinyConfig(), o)).value();
    TANDEM_CHECK_OK(model->InitRandom(9, 0.5f));
    TANDEM_CHECK_OK(model->SaveSafetensors(dir.Join("model"), DType::kF32));
  }
  std::filesystem::create_directories(dir.Join("data"));
  std::filesystem::create_directories(dir.Join("adapters"));
  {
    std::ofstream f(dir.Join("data/pairs.jsonl"));
    const char* pairs[][2] = {{"red", "sun"}, {"cat", "ink"}, {"map", "owl"}, {"jam", "fig"}};
    for (int rep = 0; rep < 4; ++rep) {
      for (const auto& p : pairs) {
        f << json{{"prompt", std::string(p[0]) + "="}, {"completion", p[1]}}.dump() << "\n";
      }
    }
  }
  const std::vector<std::string> args = {TandemBinary(),
                                         "serve",
                                         "--model",
                                         dir.Join("model"),
                                         "--name",
                                         "base",
                                         "--device",
                                         "cpu",
                                         "--port",
                                         "0",
                                         "--pool-bytes",
                                         "4194304",
                                         "--max-batch-tokens",
                                         "64",
                                         "--finetune-dir",
                                         dir.Join("data"),
                                         "--adapter-dir",
                                         dir.Join("adapters"),
                                         "--finetune-state-dir",
                                         dir.Join("state"),
                                         "--finetune-snapshot-steps",
                                         "1",
                                         "--finetune-micro-batch-tokens",
                                         "32"};
  std::string log;
  ServeProcess first;
  int port = first.Start(args, &log);
  ASSERT_GT(port, 0) << log;

  httplib::Result created = PostJson(port, "/v1/fine_tuning/jobs",
                                     {{"training_file", dir.Join("data/pairs.jsonl")},
                                      {"suffix", "pairs"},
                                      {"n_epochs", 100000},
                                      {"batch_size", 4},
                                      {"learning_rate", 0.02},
                                      {"target_modules", "all-linear"}});
  ASSERT_TRUE(created);
  ASSERT_EQ(created->status, 200) << created->body;
  const std::string id = json::parse(created->body)["id"];
  // 4 steps per epoch: "pairs@1" is published at step 4, snapshots every step.
  json job = PollJob(port, id, [](const json& j) { return j["step"].get<int64_t>() >= 6; });
  ASSERT_GE(job["step"].get<int64_t>(), 6) << job.dump();
  EXPECT_EQ(job["status"], "running");
  EXPECT_EQ(job["fine_tuned_model"].is_string(), true) << job.dump();
  first.Kill();

  ServeProcess second;
  log.clear();
  port = second.Start(args, &log);
  ASSERT_GT(port, 0) << log;
  job = GetJson(port, "/v1/fine_tuning/jobs/" + id);
  EXPECT_EQ(job["resumed"], true) << job.dump();
  EXPECT_GE(job["step"].get<int64_t>(), 5) << "the last snapshot before the kill";
  EXPECT_NE(GetJson(port, "/v1/models").dump().find("\"pairs@1\""), std::string::npos);
  httplib::Result c = PostJson(port, "/v1/completions",
                               {{"model", "pairs@1"}, {"prompt", "red="}, {"max_tokens", 3}});
  ASSERT_TRUE(c);
  EXPECT_EQ(c->status, 200) << c->body;
  const int64_t resumed_at = job["step"].get<int64_t>();
  job = PollJob(port, id, [&](const json& j) { return j["step"].get<int64_t>() > resumed_at; });
  EXPECT_GT(job["step"].get<int64_t>(), resumed_at) << "the job trains again after the restart";
  httplib::Result cancel = PostJson(port, "/v1/fine_tuning/jobs/" + id + "/cancel", json::object());
  ASSERT_TRUE(cancel);
  EXPECT_EQ(json::parse(cancel->body)["status"], "cancelled");
  EXPECT_EQ(second.Terminate(), 0) << log;
}

}  // namespace
}  // namespace tandem::serve
