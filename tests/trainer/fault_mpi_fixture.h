// The fixture of the mpirun fault tests (fault_mpi_e2e_test.cc, fault_m2_e2e_test.cc,
// fault_soak_slow_test.cc): child processes (mpirun, `tandem agent`) killed whatever happens, the
// rank pids under mpirun, nodes_ agents forming a group (default 2 nodes, k = 1, m = 1) over free
// ports, `tandem train` over dp<nodes_> (one rank per node) with a snapshot every update, and the
// bitwise comparison with an uninterrupted mpirun run.
#pragma once

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <sstream>
#include <thread>

#include "checkpoint/agent.h"
#include "checkpoint/snapshot_store.h"
#include "checkpoint/universal.h"
#include "tests/common/testing.h"

namespace tandem::fault_testing {

namespace fs = std::filesystem;
using testing::TempDir;
using Clock = std::chrono::steady_clock;

inline constexpr int kSteps = 60;  // the fault matrix's run length (the soak sets its own)
inline constexpr double kCollectiveTimeoutS = 5;
inline constexpr int kMaxNodes = 8;

inline std::string TandemBinary() {
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  return (exe.parent_path().parent_path() / "bin" / "tandem").string();
}

inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The child processes of `parent` (from /proc/<pid>/stat).
inline std::vector<pid_t> ChildrenOf(pid_t parent) {
  std::vector<pid_t> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/proc", ec)) {
    const std::string name = e.path().filename().string();
    if (name.empty() || !std::isdigit(static_cast<unsigned char>(name[0]))) continue;
    const std::string stat = ReadFile(e.path().string() + "/stat");
    const size_t close = stat.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(stat.substr(close + 2));
    char state = 0;
    pid_t ppid = 0;
    rest >> state >> ppid;
    if (ppid == parent) out.push_back(std::stoi(name));
  }
  return out;
}

// The pid of MPI rank `rank` among mpirun's children (OMPI_COMM_WORLD_RANK in its environment).
inline pid_t RankPid(pid_t mpirun, int rank) {
  const std::string want = StrCat("OMPI_COMM_WORLD_RANK=", rank);
  for (pid_t p : ChildrenOf(mpirun)) {
    std::string env = ReadFile(StrCat("/proc/", p, "/environ"));
    std::replace(env.begin(), env.end(), '\0', '\n');
    if (("\n" + env).find("\n" + want + "\n") != std::string::npos) return p;
  }
  return -1;
}

// A child process (in its own process group) with stdout and stderr in `log`; it and its
// children are killed (SIGKILL) when destroyed.
class Child {
 public:
  Child(const std::vector<std::string>& args, const std::string& log,
        const std::vector<std::pair<std::string, std::string>>& env = {}) {
    pid_ = fork();
    if (pid_ == 0) {
      setpgid(0, 0);
      prctl(PR_SET_PDEATHSIG, SIGKILL);  // no orphaned agents or jobs if the test dies
      for (const auto& [k, v] : env) setenv(k.c_str(), v.c_str(), 1);
      if (std::freopen(log.c_str(), "w", stdout) == nullptr) _exit(126);
      dup2(STDOUT_FILENO, STDERR_FILENO);
      std::vector<char*> argv;
      for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      execvp(argv[0], argv.data());
      _exit(127);
    }
  }
  ~Child() { Kill(); }
  pid_t pid() const { return pid_; }
  void Kill() {
    if (pid_ <= 0) return;
    for (pid_t c : ChildrenOf(pid_)) kill(c, SIGKILL);
    kill(-pid_, SIGKILL);
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  // Exit status (128 + signal when killed), or -1 when not finished within `seconds`.
  int Wait(double seconds) {
    const auto end = Clock::now() + std::chrono::duration<double>(seconds);
    while (pid_ > 0 && Clock::now() < end) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return -1;
  }
  bool Running() {
    int status = 0;
    return pid_ > 0 && waitpid(pid_, &status, WNOHANG) == 0;
  }

 private:
  pid_t pid_ = -1;
};

inline void WriteCorpus(const std::string& path) {
  const char* words[] = {"the", "jury", "said", "city", "of", "a", "report", "was", "new"};
  std::mt19937 gen(5);
  std::ofstream out(path);
  for (int d = 0; d < 300; ++d) {
    std::string text;
    for (int w = 0; w < 30; ++w) text += std::string(w ? " " : "") + words[gen() % 9];
    out << nlohmann::json({{"text", text + "."}}).dump() << "\n";
  }
}

// `n` distinct free TCP ports on 127.0.0.1 (bound to port 0, then released).
inline std::vector<int> FreePorts(int n) {
  std::vector<int> fds(n), ports(n);
  for (int i = 0; i < n; ++i) {
    fds[i] = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(a);
    TANDEM_CHECK(bind(fds[i], reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0);
    TANDEM_CHECK(getsockname(fds[i], reinterpret_cast<sockaddr*>(&a), &len) == 0);
    ports[i] = ntohs(a.sin_port);
  }
  for (int fd : fds) close(fd);
  return ports;
}

// The step in the heartbeat file ("<step> <unix time>"), 0 when there is none yet.
inline int64_t HeartbeatStep(const std::string& path) {
  std::ifstream in(path);
  int64_t step = 0;
  in >> step;
  return step;
}

inline void ExpectBitwiseEqual(const std::string& want_path, const std::string& got_path) {
  auto a = checkpoint::UniversalReader::Open(want_path);
  auto b = checkpoint::UniversalReader::Open(got_path);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  ASSERT_EQ(a->tensors().size(), b->tensors().size());
  EXPECT_EQ(a->meta().step, b->meta().step);
  EXPECT_EQ(a->meta().data_position_json, b->meta().data_position_json);
  for (const checkpoint::TensorInfo& info : a->tensors()) {
    auto x = a->ReadAll(info.name, info.adapter);
    auto y = b->ReadAll(info.name, info.adapter);
    ASSERT_TRUE(x.ok() && y.ok()) << info.name;
    const std::pair<const Tensor*, const Tensor*> pairs[] = {
        {&x->master, &y->master}, {&x->exp_avg, &y->exp_avg}, {&x->exp_avg_sq, &y->exp_avg_sq}};
    for (const auto& [tx, ty] : pairs) {
      ASSERT_EQ(tx->numel(), ty->numel()) << info.name;
      EXPECT_EQ(0, std::memcmp(tx->data<float>(), ty->data<float>(), tx->numel() * 4))
          << info.name << " differs from the uninterrupted run";
    }
  }
}

// The data, the corpus and the two uninterrupted references (dp<nodes_>, the same with ZeRO-1),
// made once per suite: a suite keeps one nodes_ (set it in the derived fixture's constructor).
class FaultMpiTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    RemoveStaleShm();
    shared_ = new TempDir();
    WriteCorpus(shared_->Join("corpus.jsonl"));
    std::ofstream(shared_->Join("run.toml")) << "# every key is set with --set\n";
  }
  static void TearDownTestSuite() {
    delete shared_;
    shared_ = nullptr;
  }

  void SetUp() override {
    ASSERT_TRUE(fs::exists(TandemBinary())) << TandemBinary() << " is missing";
    // TANDEM_FAULT_SEED=<seed> replays a failed case (the seed is in every failure message).
    const char* fixed = std::getenv("TANDEM_FAULT_SEED");
    seed_ = fixed != nullptr ? static_cast<uint32_t>(std::stoul(fixed)) : std::random_device{}();
    gen_.seed(seed_);
    RecordProperty("seed", std::to_string(seed_));
  }
  void TearDown() override {
    for (auto& a : agents_) a.reset();
    std::error_code ec;
    for (const auto& e : fs::directory_iterator("/dev/shm", ec)) {
      if (e.path().filename().string().rfind(ShmStem(), 0) == 0) fs::remove(e.path(), ec);
    }
  }

  // Agents killed with their test (a CI timeout) leave their regions: remove those of dead tests.
  static void RemoveStaleShm() {
    std::error_code ec;
    const std::regex stem("tandem-fm-([0-9]+)-.*");
    for (const auto& e : fs::directory_iterator("/dev/shm", ec)) {
      std::smatch m;
      const std::string name = e.path().filename().string();
      if (std::regex_match(name, m, stem) && !fs::exists("/proc/" + m[1].str()))
        fs::remove(e.path(), ec);
    }
  }
  std::string ShmStem() const { return StrCat("tandem-fm-", getpid(), "-", this_case_); }

  // The uninterrupted run's final universal checkpoint (run once per config).
  std::string Reference(bool zero) {
    const std::string run = zero ? "ref-zero" : "ref";
    const std::string want =
        shared_->Join(StrCat(run, "/checkpoints/universal/step-", steps_, ".h5"));
    if (!fs::exists(want)) {
      Child ref(Mpirun(TrainArgs(shared_->Join(run), zero, false)), shared_->Join(run + ".log"),
                MpiEnv());
      EXPECT_EQ(ref.Wait(120), 0) << ReadFile(shared_->Join(run + ".log"));
    }
    return want;
  }

  static std::vector<std::pair<std::string, std::string>> MpiEnv() {
    return {{"OMPI_MCA_btl", "self,vader"},
            {"OMPI_MCA_pml", "ob1"},
            {"OMPI_MCA_btl_vader_single_copy_mechanism", "none"},
            {"OMP_NUM_THREADS", "1"}};
  }
  std::vector<std::string> Mpirun(std::vector<std::string> train) const {
    std::vector<std::string> a = {"mpirun", "--oversubscribe", "--allow-run-as-root", "--bind-to",
                                  "none",   "-np",            std::to_string(nodes_)};
    a.insert(a.end(), train.begin(), train.end());
    return a;
  }
  // `tandem train` over dp<nodes_> into `out_dir`; with `agents`, snapshots every update into
  // this case's agents and writes a heartbeat file next to `out_dir`.
  std::vector<std::string> TrainArgs(const std::string& out_dir, bool zero, bool agents) const {
    const TempDir& d = *shared_;
    std::vector<std::string> a = {TandemBinary(), "train", d.Join("run.toml")};
    std::vector<std::string> sets = {"model.hidden_size=32",
                                     "model.intermediate_size=48",
                                     "model.num_layers=2",
                                     "model.num_heads=4",
                                     "model.num_kv_heads=2",
                                     "model.max_position_embeddings=64",
                                     "data.dir=\"" + d.Join("data") + "\"",
                                     "data.inputs=[\"" + d.Join("corpus.jsonl") + "\"]",
                                     "data.seq_len=32",
                                     "train.micro_batch_size=2",
                                     StrCat("train.steps=", steps_),
                                     "train.save_interval=25",
                                     "train.lr=3e-3",
                                     "train.warmup_steps=5",
                                     "train.eval_interval=0",
                                     "train.eval_batches=1",
                                     StrCat("parallel.timeout_s=", kCollectiveTimeoutS),
                                     StrCat("parallel.zero=", zero ? 1 : 0),
                                     "train.out_dir=\"" + out_dir + "\""};
    if (agents) {
      sets.push_back("snapshot.agent_socket=\"" + dir_.Join("node{node}.sock") + "\"");
      sets.push_back("snapshot.ranks_per_node=1");
      sets.push_back("train.heartbeat_file=\"" + out_dir + ".heartbeat\"");
    }
    for (const std::string& s : sets) {
      a.push_back("--set");
      a.push_back(s);
    }
    if (agents) a.push_back("--resume");
    return a;
  }

  std::string Socket(int node) const { return dir_.Join(StrCat("node", node, ".sock")); }
  // Starts (or restarts, empty) node `node`'s agent of the nodes_-node group (m = m_).
  void StartAgent(int node) {
    agents_[node].reset();
    fs::remove(Socket(node));
    std::string group;
    for (int port : ports_) group += StrCat(group.empty() ? "" : ",", "127.0.0.1:", port);
    std::vector<std::string> args = {TandemBinary(), "agent", "--socket", Socket(node), "--node",
                                     std::to_string(node), "--group", group, "--m",
                                     std::to_string(m_), "--peer-timeout", "5", "--shm-prefix",
                                     StrCat(ShmStem(), "-n", node)};
    if (test_hooks_) args.push_back("--test-hooks");
    agents_[node] = std::make_unique<Child>(
        args, dir_.Join(StrCat("agent", node, "-", ++agent_starts_, ".log")));
    auto c = checkpoint::AgentClient::Connect(Socket(node), 20);
    ASSERT_TRUE(c.ok()) << c.status().ToString() << "\n" << AgentLogs();
  }
  void StartAgents(const std::string& name) {
    this_case_ = name;
    TANDEM_CHECK(nodes_ >= 2 && nodes_ <= kMaxNodes && m_ >= 1 && m_ < nodes_);
    ports_ = FreePorts(nodes_);
    for (int node = 0; node < nodes_; ++node) StartAgent(node);
  }
  std::string AgentLogs() const {
    std::string all;
    for (int i = 1; i <= agent_starts_; ++i) {
      for (int n = 0; n < nodes_; ++n) {
        const std::string p = dir_.Join(StrCat("agent", n, "-", i, ".log"));
        if (fs::exists(p)) all += StrCat("--- ", p, "\n", ReadFile(p));
      }
    }
    return all;
  }

  // Starts the job and waits until rank 0's heartbeat reaches `at`; the job keeps running.
  std::unique_ptr<Child> StartJobUntil(const std::string& run, bool zero, int64_t at) {
    auto job = std::make_unique<Child>(Mpirun(TrainArgs(dir_.Join(run), zero, true)), Log(run, 1),
                                       MpiEnv());
    const auto end = Clock::now() + std::chrono::seconds(60);
    while (Clock::now() < end && job->Running() && HeartbeatStep(Heartbeat(run)) < at) {
      std::this_thread::sleep_for(std::chrono::microseconds(300));
    }
    EXPECT_GE(HeartbeatStep(Heartbeat(run)), at) << "the job ended early:\n"
                                                 << ReadFile(Log(run, 1));
    return job;
  }
  // mpirun must end (non-zero) within `seconds` once a rank died or hung.
  void ExpectJobEnds(Child& job, const std::string& run, double seconds) {
    const int rc = job.Wait(seconds);
    EXPECT_NE(rc, -1) << "mpirun still running " << seconds << " s after the fault:\n"
                      << ReadFile(Log(run, 1));
    EXPECT_NE(rc, 0) << "mpirun reported success after a rank was lost:\n" << ReadFile(Log(run, 1));
  }
  // Relaunches the job; returns its log once it finished.
  std::string Relaunch(const std::string& run, bool zero) {
    Child again(Mpirun(TrainArgs(dir_.Join(run), zero, true)), Log(run, 2), MpiEnv());
    const int rc = again.Wait(120);
    const std::string log = ReadFile(Log(run, 2));
    if (std::getenv("TANDEM_FAULT_VERBOSE") != nullptr) std::printf("%s", log.c_str());
    EXPECT_EQ(rc, 0) << "the relaunch failed:\n" << log << AgentLogs();
    return log;
  }
  // The step the relaunch resumed from its snapshot; it lost at most one update (interval 1):
  // rank 0 wrote heartbeat `last` only after every node published the snapshot of last - 1.
  void ExpectResumedFromSnapshot(const std::string& log, int64_t last) {
    std::smatch m;
    ASSERT_TRUE(std::regex_search(
        log, m, std::regex("resumed from the in-memory snapshot of step ([0-9]+)")))
        << log << AgentLogs();
    const int64_t resumed = std::stoll(m[1]);
    std::printf(
        "[ fault    ] seed %u: last heartbeat before the fault %lld, resumed from the snapshot of "
        "%lld\n",
        seed_, static_cast<long long>(last), static_cast<long long>(resumed));
    EXPECT_GE(resumed, last - 1) << "the last heartbeat before the fault was step " << last;
    EXPECT_LE(resumed, last + 1) << "the last heartbeat before the fault was step " << last;
  }
  void ExpectFinalEqualsReference(const std::string& run, bool zero) {
    const std::string got = dir_.Join(StrCat(run, "/checkpoints/universal/step-", steps_, ".h5"));
    ASSERT_TRUE(fs::exists(got)) << got << " is missing";
    ExpectBitwiseEqual(Reference(zero), got);
  }

  // Case 1: kill -9 a random rank at a random update.
  void KillRankCase(const std::string& name, bool zero) {
    StartAgents(name);
    const int64_t at = RandomStep(5, 50);
    const int victim = static_cast<int>(gen_() % nodes_);
    SCOPED_TRACE(::testing::Message()
                 << "seed " << seed_ << ": kill -9 rank " << victim << " after step " << at);
    Reference(zero);
    auto job = StartJobUntil("run", zero, at);
    const pid_t pid = RankPid(job->pid(), victim);
    ASSERT_GT(pid, 0) << "no rank " << victim << " under mpirun " << job->pid();
    kill(pid, SIGKILL);
    ExpectJobEnds(*job, "run", kCollectiveTimeoutS + 15);
    const int64_t last = HeartbeatStep(Heartbeat("run"));
    ExpectResumedFromSnapshot(Relaunch("run", zero), last);
    ExpectFinalEqualsReference("run", zero);
  }

  // A fault step in [lo, hi], never in the 4 steps up to a universal checkpoint (save_interval
  // 25): a job killed there may have written the checkpoint of step 25 before every node held the
  // snapshot of it, and the relaunch then rightly resumes from that newer checkpoint instead of
  // the snapshot these tests are about (seen once under a loaded ctest -j2).
  int64_t RandomStep(int64_t lo, int64_t hi) {
    while (true) {
      const int64_t step = lo + static_cast<int64_t>(gen_() % static_cast<uint64_t>(hi - lo + 1));
      if (step % 25 != 0 && step % 25 < 22) return step;
    }
  }
  std::string Log(const std::string& run, int attempt) const {
    return dir_.Join(StrCat(run, attempt, ".log"));
  }
  std::string Heartbeat(const std::string& run) const { return dir_.Join(run + ".heartbeat"); }

  inline static TempDir* shared_ = nullptr;
  int64_t steps_ = kSteps;  // train.steps (the references are made once per suite: one value)
  int nodes_ = 2;           // emulated nodes = agents = ranks (one per node); one value per suite
  int m_ = 1;               // parity fragments of the group (k = nodes_ - m_)
  bool test_hooks_ = false;  // agents serve TEST_CORRUPT
  TempDir dir_;
  std::unique_ptr<Child> agents_[kMaxNodes];
  std::vector<int> ports_;
  int agent_starts_ = 0;
  std::string this_case_;
  uint32_t seed_ = 0;
  std::mt19937 gen_;
};

}  // namespace tandem::fault_testing
