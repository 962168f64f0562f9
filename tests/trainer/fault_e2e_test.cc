// Crash recovery of `tandem train` with real processes: a snapshot agent (`tandem agent`) and a
// trainer that is killed with SIGKILL in the middle of its run, then relaunched with --resume.
//   - trainer killed: the relaunch resumes from the agent's in-memory snapshot, losing at most
//     the snapshot interval (1 update), and its final state is bitwise the uninterrupted run's;
//   - trainer and agent killed (the node lost, no peers): the relaunch says the agents hold no
//     snapshot and resumes from the newest universal checkpoint, again ending bitwise equal;
//   - kill during the snapshot copy is covered by killing at random points of a run that
//     snapshots every update;
//   - SIGTERM (preemption): the trainer stops after its update, saves, exits 143, and --resume
//     continues to the uninterrupted run's final state;
//   - with bf16 optimizer state (optimizer.precision = "bf16": bf16 moments beside f32 weights
//     in each snapshot), a killed trainer again resumes from the agent, bitwise.
// f32 on the CPU; a tiny model so that each update takes milliseconds.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <sstream>
#include <thread>

#include "checkpoint/universal.h"
#include "tests/common/testing.h"

namespace tandem {
namespace {

using testing::TempDir;
using Clock = std::chrono::steady_clock;

std::string TandemBinary() {
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  return (exe.parent_path().parent_path() / "bin" / "tandem").string();
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A child process with stdout and stderr in `log`; killed (SIGKILL) when destroyed.
class Child {
 public:
  Child(const std::vector<std::string>& args, const std::string& log) {
    pid_ = fork();
    if (pid_ == 0) {
      FILE* f = std::freopen(log.c_str(), "w", stdout);
      if (f == nullptr) _exit(126);
      dup2(STDOUT_FILENO, STDERR_FILENO);
      std::vector<char*> argv;
      for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
  }
  ~Child() { Kill(); }
  // SIGTERM, then SIGKILL if still there after 5 s.
  void Stop() {
    if (pid_ <= 0) return;
    kill(pid_, SIGTERM);
    if (Wait(5) < 0) Kill();
  }
  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  // Exit status, or -1 when not finished within `seconds`.
  int Wait(double seconds) {
    const auto end = Clock::now() + std::chrono::duration<double>(seconds);
    while (Clock::now() < end) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return -1;
  }
  pid_t pid() const { return pid_; }
  bool Running() {
    int status = 0;
    return pid_ > 0 && waitpid(pid_, &status, WNOHANG) == 0;
  }

 private:
  pid_t pid_ = -1;
};

void WriteCorpus(const std::string& path) {
  const char* words[] = {"the", "jury", "said", "city", "of", "a", "report", "was", "new"};
  std::mt19937 gen(3);
  std::ofstream out(path);
  for (int d = 0; d < 300; ++d) {
    std::string text;
    for (int w = 0; w < 30; ++w) text += std::string(w ? " " : "") + words[gen() % 9];
    out << nlohmann::json({{"text", text + "."}}).dump() << "\n";
  }
}

constexpr int kSteps = 80;

std::vector<std::string> TrainArgs(const TempDir& dir, const std::string& run) {
  std::vector<std::string> a = {TandemBinary(), "train", dir.Join("run.toml")};
  for (const std::string& s :
       {std::string("model.hidden_size=32"), std::string("model.intermediate_size=48"),
        std::string("model.num_layers=2"), std::string("model.num_heads=4"),
        std::string("model.num_kv_heads=2"), std::string("model.max_position_embeddings=64"),
        "data.dir=\"" + dir.Join("data") + "\"", "data.inputs=[\"" + dir.Join("corpus.jsonl") + "\"]",
        std::string("data.seq_len=32"), std::string("train.micro_batch_size=4"),
        StrCat("train.steps=", kSteps), std::string("train.save_interval=25"),
        std::string("train.lr=3e-3"), std::string("train.warmup_steps=5"),
        std::string("train.eval_interval=0"), std::string("train.eval_batches=1"),
        "train.out_dir=\"" + dir.Join(run) + "\"",
        "train.heartbeat_file=\"" + dir.Join(run + ".heartbeat") + "\""}) {
    a.push_back("--set");
    a.push_back(s);
  }
  return a;
}

std::vector<std::string> WithAgent(std::vector<std::string> a, const std::string& socket) {
  a.push_back("--set");
  a.push_back("snapshot.agent_socket=\"" + socket + "\"");
  a.push_back("--resume");
  return a;
}

// The step in the heartbeat file, 0 when there is none yet.
int64_t HeartbeatStep(const std::string& path) {
  std::ifstream in(path);
  int64_t step = 0;
  in >> step;
  return step;
}

// Starts a trainer and kills it once its heartbeat reaches `kill_at`; returns the step seen.
int64_t RunAndKill(const std::vector<std::string>& args, const std::string& heartbeat,
                   const std::string& log, int64_t kill_at) {
  Child trainer(args, log);
  const auto end = Clock::now() + std::chrono::seconds(120);
  int64_t seen = 0;
  while (Clock::now() < end && trainer.Running()) {
    seen = HeartbeatStep(heartbeat);
    if (seen >= kill_at) break;
    std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
  trainer.Kill();
  return seen;
}

void ExpectBitwiseEqual(const std::string& want_path, const std::string& got_path) {
  auto a = checkpoint::UniversalReader::Open(want_path);
  auto b = checkpoint::UniversalReader::Open(got_path);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  ASSERT_EQ(a->tensors().size(), b->tensors().size());
  EXPECT_EQ(a->meta().data_position_json, b->meta().data_position_json);
  for (const checkpoint::TensorInfo& info : a->tensors()) {
    auto x = a->ReadAll(info.name, info.adapter);
    auto y = b->ReadAll(info.name, info.adapter);
    ASSERT_TRUE(x.ok() && y.ok()) << info.name;
    const std::pair<const Tensor*, const Tensor*> pairs[] = {
        {&x->master, &y->master}, {&x->exp_avg, &y->exp_avg}, {&x->exp_avg_sq, &y->exp_avg_sq}};
    for (const auto& [tx, ty] : pairs) {
      ASSERT_EQ(tx->numel(), ty->numel()) << info.name;
      EXPECT_EQ(0, std::memcmp(tx->data<float>(), ty->data<float>(), tx->numel() * 4)) << info.name;
    }
  }
}

class FaultTest : public ::testing::Test {
 protected:
  // Settings every run of the test adds (the bf16-state variant's).
  virtual std::vector<std::string> Extra() const { return {}; }
  std::vector<std::string> Args(const std::string& run) const {
    std::vector<std::string> a = TrainArgs(dir_, run);
    for (const std::string& e : Extra()) {
      a.push_back("--set");
      a.push_back(e);
    }
    return a;
  }
  void KilledTrainerResumesFromTheAgent();
  void SetUp() override {
    ASSERT_TRUE(std::filesystem::exists(TandemBinary())) << TandemBinary() << " is missing";
    WriteCorpus(dir_.Join("corpus.jsonl"));
    std::ofstream(dir_.Join("run.toml")) << "# every key is set with --set\n";
    // The uninterrupted reference (also prepares the data once).
    Child ref(Args("ref"), dir_.Join("ref.log"));
    ASSERT_EQ(ref.Wait(120), 0) << ReadFile(dir_.Join("ref.log"));
    want_ = dir_.Join(StrCat("ref/checkpoints/universal/step-", kSteps, ".h5"));
  }
  void TearDown() override {
    for (auto& agent : agents_) agent->Stop();
    // Agents killed with SIGKILL (a lost node) leave their shared memory behind.
    for (const auto& e : std::filesystem::directory_iterator("/dev/shm")) {
      if (e.path().filename().string().rfind(prefix_, 0) == 0) std::filesystem::remove(e.path());
    }
  }
  Child* StartAgent(const std::string& name) {
    agents_.push_back(std::make_unique<Child>(
        std::vector<std::string>{TandemBinary(), "agent", "--socket", dir_.Join(name + ".sock"),
                                 "--shm-prefix", prefix_ + name},
        dir_.Join(name + ".log")));
    return agents_.back().get();
  }
  std::vector<std::unique_ptr<Child>> agents_;
  TempDir dir_;
  std::string want_;
  const std::string prefix_ = StrCat("tandem-fault-test-", getpid(), "-");
};

void FaultTest::KilledTrainerResumesFromTheAgent() {
  StartAgent("agent");
  const std::string sock = dir_.Join("agent.sock");
  const auto args = WithAgent(Args("run"), sock);
  std::mt19937 gen(std::random_device{}());
  const int64_t kill_at = 10 + static_cast<int64_t>(gen() % 50);
  const int64_t killed = RunAndKill(args, dir_.Join("run.heartbeat"), dir_.Join("run1.log"), kill_at);
  ASSERT_GE(killed, kill_at) << "the trainer ended before the kill:\n" << ReadFile(dir_.Join("run1.log"));
  Child again(args, dir_.Join("run2.log"));
  ASSERT_EQ(again.Wait(120), 0) << ReadFile(dir_.Join("run2.log"));
  const std::string log = ReadFile(dir_.Join("run2.log"));
  std::smatch m;
  ASSERT_TRUE(std::regex_search(log, m, std::regex("resumed from the in-memory snapshot of step ([0-9]+)")))
      << log;
  const int64_t resumed = std::stoll(m[1]);
  EXPECT_GE(resumed, killed - 1) << "killed after step " << killed << " (snapshot every update)";
  EXPECT_LE(resumed, killed + 1);
  ExpectBitwiseEqual(want_, dir_.Join(StrCat("run/checkpoints/universal/step-", kSteps, ".h5")));
}

TEST_F(FaultTest, KilledTrainerResumesFromTheAgentLosingAtMostOneUpdate) {
  KilledTrainerResumesFromTheAgent();
}

class FaultBf16StateTest : public FaultTest {
 protected:
  std::vector<std::string> Extra() const override { return {"optimizer.precision=\"bf16\""}; }
};

TEST_F(FaultBf16StateTest, KilledTrainerResumesFromTheAgentBitwise) {
  KilledTrainerResumesFromTheAgent();
}

TEST_F(FaultTest, LostNodeFallsBackToTheUniversalCheckpoint) {
  Child* agent = StartAgent("agent");
  const std::string sock = dir_.Join("agent.sock");
  const auto args = WithAgent(Args("run"), sock);
  const int64_t killed = RunAndKill(args, dir_.Join("run.heartbeat"), dir_.Join("run1.log"), 40);
  ASSERT_GE(killed, 40) << ReadFile(dir_.Join("run1.log"));
  agent->Kill();  // the whole node: its agent's memory is gone
  std::filesystem::remove(sock);
  StartAgent("agent2");
  const auto args2 = WithAgent(Args("run"), dir_.Join("agent2.sock"));
  Child again(args2, dir_.Join("run2.log"));
  ASSERT_EQ(again.Wait(120), 0) << ReadFile(dir_.Join("run2.log"));
  const std::string log = ReadFile(dir_.Join("run2.log"));
  EXPECT_NE(log.find("no complete snapshot in the agents"), std::string::npos) << log;
  EXPECT_NE(log.find("resumed from " + dir_.Join("run/checkpoints/universal/step-25.h5")), std::string::npos)
      << log;
  ExpectBitwiseEqual(want_, dir_.Join(StrCat("run/checkpoints/universal/step-", kSteps, ".h5")));
}

TEST_F(FaultTest, SigtermStopsAfterTheUpdateSavesAndResumes) {
  const std::string heartbeat = dir_.Join("run.heartbeat");
  Child trainer(Args("run"), dir_.Join("run1.log"));
  const auto end = Clock::now() + std::chrono::seconds(120);
  while (Clock::now() < end && trainer.Running() && HeartbeatStep(heartbeat) < 30) {
    std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
  ASSERT_TRUE(trainer.Running()) << "the trainer ended before the signal:\n" << ReadFile(dir_.Join("run1.log"));
  ASSERT_EQ(kill(trainer.pid(), SIGTERM), 0);
  ASSERT_EQ(trainer.Wait(60), 128 + SIGTERM) << ReadFile(dir_.Join("run1.log"));
  const std::string log = ReadFile(dir_.Join("run1.log"));
  std::smatch m;
  ASSERT_TRUE(std::regex_search(log, m, std::regex("stopping after update ([0-9]+) on signal 15"))) << log;
  const int64_t stopped = std::stoll(m[1]);
  EXPECT_GE(stopped, 30);
  EXPECT_LT(stopped, kSteps) << "the signal came before the last update";
  EXPECT_EQ(HeartbeatStep(heartbeat), stopped);
  // What it saved is the state after that update: the resumed run ends bitwise where the
  // uninterrupted one did.
  const std::string saved = dir_.Join(StrCat("run/checkpoints/universal/step-", stopped, ".h5"));
  ASSERT_TRUE(std::filesystem::exists(saved)) << log;
  std::vector<std::string> args = Args("run");
  args.push_back("--resume");
  Child again(args, dir_.Join("run2.log"));
  ASSERT_EQ(again.Wait(120), 0) << ReadFile(dir_.Join("run2.log"));
  EXPECT_NE(ReadFile(dir_.Join("run2.log")).find("resumed from " + saved), std::string::npos)
      << ReadFile(dir_.Join("run2.log"));
  ExpectBitwiseEqual(want_, dir_.Join(StrCat("run/checkpoints/universal/step-", kSteps, ".h5")));
}

}  // namespace
}  // namespace tandem
