// The job supervisor (`tandem run`, launch/internal/supervisor.h) against a fake job
// (tests/launch/fake_job.sh) that honours the trainer's contract: finishing first time, failing
// and relaunching with backoff, hangs (stale heartbeat, SIGSTOP), giving up after
// --max-restarts, agents killed between attempts (restart + REBUILD), SIGTERM to the supervisor,
// and real mpirun. After every run no process the fake job started may be left alive.
#include "launch/internal/supervisor.h"

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>

#include "tests/common/testing.h"

namespace tandem::launch::internal {
namespace {

using nlohmann::json;
using testing::TempDir;

// True when a TCP socket can bind 127.0.0.1:port right now.
bool PortBindable(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return false;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const bool ok = bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  return ok;
}

// A base port whose `count` consecutive ports are free now, below Linux's ephemeral range
// (32768-60999), where the client sockets of tests running beside this one take their ports.
int FreePortRun(int count) {
  for (int i = 0; i < 2000; ++i) {
    const int base = 20000 + (getpid() * 7 + i * 13) % 12000;
    bool all_free = true;
    for (int k = 0; k < count && all_free; ++k) all_free = PortBindable(base + k);
    if (all_free) return base;
  }
  return 20000 + getpid() % 12000;
}

// The `tandem` binary beside this test's build tree (bin/ next to tests/), or $TANDEM_BIN.
std::string TandemBinary() {
  if (const char* bin = std::getenv("TANDEM_BIN")) return bin;
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  return (exe.parent_path().parent_path() / "bin" / "tandem").string();
}

// kill(pid, 0) succeeds and the process is not a zombie (an orphan reaped by nobody is dead).
bool Alive(pid_t pid) {
  if (kill(pid, 0) != 0) return false;
  std::ifstream in(StrCat("/proc/", pid, "/stat"));
  std::string line;
  if (!std::getline(in, line)) return false;
  const size_t close = line.rfind(')');
  return close == std::string::npos || line.size() < close + 3 || line[close + 2] != 'Z';
}

std::vector<json> Events(const std::string& run_dir) {
  std::ifstream in(run_dir + "/supervisor.jsonl");
  std::vector<json> out;
  for (std::string line; std::getline(in, line);) out.push_back(json::parse(line));
  return out;
}

std::vector<json> OfKind(const std::vector<json>& events, const std::string& kind) {
  std::vector<json> out;
  for (const json& e : events) {
    if (e["event"] == kind) out.push_back(e);
  }
  return out;
}

// A run directory, a plan for the fake job (one action per attempt) and supervisor options.
class FakeJob {
 public:
  explicit FakeJob(const std::vector<std::string>& plan) {
    const std::string script = Install("fake_job.sh");
    plan_ = dir_.Join("plan");
    std::ofstream out(plan_);
    for (const std::string& line : plan) out << line << "\n";
    o.np = 2;
    o.ranks_per_node = 1;
    o.run_dir = dir_.Join("run");
    o.launcher = Launcher::kLocal;
    o.tandem = script;
    o.agent_binary = TandemBinary();
    o.agents = false;
    o.backoff_s = 0.2;
    o.max_backoff_s = 1;
    o.hang_timeout_s = 20;
    o.kill_grace_s = 1;
    o.agent_timeout_s = 15;
    o.job = {plan_};
  }
  ~FakeJob() { KillRecorded(); }

  // Pids of every fake rank and its background child, of every attempt.
  std::vector<pid_t> RecordedPids() const {
    std::ifstream in(plan_ + ".pids");
    std::vector<pid_t> pids;
    for (pid_t p; in >> p;) pids.push_back(p);
    return pids;
  }
  void ExpectNoOrphans() const {
    const std::vector<pid_t> pids = RecordedPids();
    EXPECT_FALSE(pids.empty()) << "the fake job recorded no pids";
    for (pid_t p : pids) EXPECT_FALSE(Alive(p)) << "process " << p << " of the job outlived it";
  }
  std::vector<json> events() const { return Events(o.run_dir); }
  // Copies tests/launch/<name> into the test's directory, executable; returns its path.
  std::string Install(const std::string& name) {
    const std::string path = dir_.Join(name);
    std::filesystem::copy_file(testing::SourceDir() + "/tests/launch/" + name, path);
    std::filesystem::permissions(path, std::filesystem::perms::owner_all);
    return path;
  }
  const std::string& plan() const { return plan_; }

  SupervisorOptions o;

 private:
  void KillRecorded() const {  // whatever a failed test left
    for (pid_t p : RecordedPids()) kill(p, SIGKILL);
  }
  TempDir dir_;
  std::string plan_;
};

TEST(Supervisor, FinishesFirstTimeWithAgentsAndPassesTheContract) {
  ASSERT_TRUE(std::filesystem::exists(TandemBinary())) << TandemBinary() << ": build `tandem`";
  FakeJob job({"ok"});
  job.o.agents = true;  // 2 nodes, m = 1: an erasure-coded pair of agents
  Status s = RunSupervisor(job.o, nullptr);
  ASSERT_TRUE(s.ok()) << s.ToString();
  const std::vector<json> ev = job.events();
  ASSERT_EQ(OfKind(ev, "attempt_start").size(), 1u);
  const json end = OfKind(ev, "attempt_end").at(0);
  EXPECT_EQ(end["reason"], "finished");
  EXPECT_EQ(end["exit_code"], 0);
  EXPECT_EQ(end["steps_reached"], 3);
  EXPECT_EQ(OfKind(ev, "agent_start").size(), 2u);
  const std::vector<json> stops = OfKind(ev, "agent_stop");
  ASSERT_EQ(stops.size(), 2u);
  for (const json& e : stops) {
    EXPECT_TRUE(e["shutdown_sent"].get<bool>()) << e.dump();
    EXPECT_EQ(e["exit"], "exit code 0") << e.dump();
    EXPECT_FALSE(Alive(e["pid"].get<pid_t>())) << e.dump();
  }
  std::ifstream args_file(job.plan() + ".args-1");
  std::string args;
  std::getline(args_file, args);
  const std::string run = job.o.run_dir;
  EXPECT_EQ(args, StrCat("train ", job.plan(), " --resume --set snapshot.agent_socket=", run,
                         "/agents/node{node}.sock --set snapshot.ranks_per_node=1 --set ",
                         "train.heartbeat_file=", run, "/heartbeat"));
  job.ExpectNoOrphans();
}

TEST(Supervisor, FailsTwiceThenFinishesWithDoublingBackoff) {
  FakeJob job({"fail", "fail", "ok"});
  Status s = RunSupervisor(job.o, nullptr);
  ASSERT_TRUE(s.ok()) << s.ToString();
  const std::vector<json> ev = job.events();
  const std::vector<json> starts = OfKind(ev, "attempt_start"), ends = OfKind(ev, "attempt_end");
  ASSERT_EQ(starts.size(), 3u);
  ASSERT_EQ(ends.size(), 3u);
  for (int a = 0; a < 2; ++a) {
    EXPECT_EQ(ends[a]["exit_code"], 3) << ends[a].dump();
    EXPECT_NE(ends[a]["reason"].get<std::string>().find("rank 1"), std::string::npos);
    EXPECT_EQ(ends[a]["steps_reached"], 1);
  }
  EXPECT_EQ(ends[2]["reason"], "finished");
  const std::vector<json> restarts = OfKind(ev, "restart");
  ASSERT_EQ(restarts.size(), 2u);
  EXPECT_DOUBLE_EQ(restarts[0]["delay_s"].get<double>(), 0.2);
  EXPECT_DOUBLE_EQ(restarts[1]["delay_s"].get<double>(), 0.4);
  for (int a = 0; a < 2; ++a) {  // the backoff was waited
    const double gap = starts[a + 1]["time"].get<double>() - ends[a]["time"].get<double>();
    EXPECT_GE(gap, restarts[a]["delay_s"].get<double>()) << "attempt " << a + 2;
  }
  job.ExpectNoOrphans();
}

TEST(Supervisor, StaleHeartbeatIsAHang) {
  FakeJob job({"hang", "ok"});
  job.o.hang_timeout_s = 1.5;
  Status s = RunSupervisor(job.o, nullptr);
  ASSERT_TRUE(s.ok()) << s.ToString();
  const std::vector<json> ends = OfKind(job.events(), "attempt_end");
  ASSERT_EQ(ends.size(), 2u);
  EXPECT_EQ(ends[0]["reason"].get<std::string>().rfind("hung: ", 0), 0u) << ends[0].dump();
  EXPECT_GE(ends[0]["duration_s"].get<double>(), 1.5);
  EXPECT_EQ(ends[1]["reason"], "finished");
  job.ExpectNoOrphans();
}

TEST(Supervisor, StoppedRankIsAHangEvenWhileRankZeroBeats) {
  FakeJob job({"stop", "ok"});
  job.o.stopped_timeout_s = 1;
  Status s = RunSupervisor(job.o, nullptr);
  ASSERT_TRUE(s.ok()) << s.ToString();
  const std::vector<json> ends = OfKind(job.events(), "attempt_end");
  ASSERT_EQ(ends.size(), 2u);
  EXPECT_NE(ends[0]["reason"].get<std::string>().find("SIGSTOP"), std::string::npos)
      << ends[0].dump();
  EXPECT_GT(ends[0]["steps_reached"].get<long>(), 1);  // rank 0 kept beating
  job.ExpectNoOrphans();
}

TEST(Supervisor, GivesUpAfterMaxRestartsNamingTheAttempts) {
  FakeJob job({"fail", "fail", "fail", "fail"});
  job.o.max_restarts = 2;
  job.o.backoff_s = 0.05;
  Status s = RunSupervisor(job.o, nullptr);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_NE(s.message().find("failed 3 times, more than --max-restarts 2"), std::string::npos)
      << s.message();
  for (int a = 1; a <= 3; ++a) {
    EXPECT_NE(s.message().find(StrCat("attempt-", a, ".log")), std::string::npos) << s.message();
  }
  EXPECT_EQ(OfKind(job.events(), "attempt_start").size(), 3u);
  EXPECT_EQ(OfKind(job.events(), "restart").size(), 2u);
  job.ExpectNoOrphans();
}

// Polls the event log until `pred` holds for some event, or 20 s pass.
json WaitForEvent(const std::string& run_dir, const std::function<bool(const json&)>& pred) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < deadline) {
    for (const json& e : Events(run_dir)) {
      if (pred(e)) return e;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return json();
}

TEST(Supervisor, AgentKilledBetweenAttemptsIsRestartedAndAskedToRebuild) {
  ASSERT_TRUE(std::filesystem::exists(TandemBinary())) << TandemBinary() << ": build `tandem`";
  FakeJob job({"waitfail", "waitfail", "ok"});
  job.o.agents = true;
  std::atomic<bool> stop{false};
  auto result = std::async(std::launch::async, [&] { return RunSupervisor(job.o, &stop); });
  // Attempt 1: the agent of node 1 dies (kill -9), then the job fails.
  const json started = WaitForEvent(
      job.o.run_dir, [](const json& e) { return e["event"] == "agent_start" && e["node"] == 1; });
  ASSERT_FALSE(started.is_null()) << "no agent_start for node 1";
  ASSERT_FALSE(WaitForEvent(job.o.run_dir, [](const json& e) {
                 return e["event"] == "attempt_start";
               }).is_null());
  ASSERT_EQ(kill(started["pid"].get<pid_t>(), SIGKILL), 0);
  std::ofstream(job.plan() + ".go") << "go\n";
  // Attempt 2: both agents die: more than m = 1, the snapshot is gone.
  ASSERT_FALSE(WaitForEvent(job.o.run_dir, [](const json& e) {
                 return e["event"] == "attempt_start" && e["attempt"] == 2;
               }).is_null());
  std::vector<pid_t> agent_pids;
  for (const json& e : job.events()) {
    if (e["event"] == "agent_start" || e["event"] == "agent_restart") {
      agent_pids.push_back(e["pid"].get<pid_t>());
    }
  }
  for (pid_t p : agent_pids) kill(p, SIGKILL);
  std::ofstream(job.plan() + ".go") << "go\n";
  Status s = result.get();
  ASSERT_TRUE(s.ok()) << s.ToString();
  const std::vector<json> ev = job.events();
  const std::vector<json> lost = OfKind(ev, "agent_lost");
  ASSERT_EQ(lost.size(), 3u);  // node 1 after attempt 1, nodes 0 and 1 after attempt 2
  EXPECT_EQ(lost[0]["node"], 1);
  EXPECT_EQ(OfKind(ev, "agent_restart").size(), 3u);
  const std::vector<json> rebuilds = OfKind(ev, "agent_rebuild");
  ASSERT_EQ(rebuilds.size(), 1u);  // after attempt 1 only: after attempt 2 there is no parity
  EXPECT_EQ(rebuilds[0]["node"], 1);
  EXPECT_FALSE(rebuilds[0]["ok"].get<bool>());  // no snapshot was ever written
  EXPECT_FALSE(rebuilds[0]["error"].get<std::string>().empty());
  const std::vector<json> gone = OfKind(ev, "snapshot_lost");
  ASSERT_EQ(gone.size(), 1u);
  EXPECT_EQ(gone[0]["nodes"], json::array({0, 1}));
  EXPECT_NE(gone[0]["message"].get<std::string>().find("universal checkpoint"), std::string::npos);
  EXPECT_EQ(OfKind(ev, "attempt_end").back()["reason"], "finished");
  for (const json& e : OfKind(ev, "agent_stop")) {
    EXPECT_TRUE(e["shutdown_sent"].get<bool>()) << e.dump();
    EXPECT_FALSE(Alive(e["pid"].get<pid_t>()));
  }
  job.ExpectNoOrphans();
}

// Two "hosts" (both this one, reached through a fake mpirun): agents are started, checked,
// rebuilt and shut down through `mpirun -np 1 --host H` (`tandem run --agent-request`).
TEST(Supervisor, AgentsOnOtherHostsAreReachedThroughMpirun) {
  ASSERT_TRUE(std::filesystem::exists(TandemBinary())) << TandemBinary() << ": build `tandem`";
  FakeJob job({"waitfail", "ok"});
  job.o.agents = true;
  job.o.launcher = Launcher::kMpirun;
  job.o.mpirun = job.Install("fake_mpirun.sh");
  job.o.hosts = {"127.0.0.1", "localhost"};
  job.o.agent_port = FreePortRun(2);
  std::atomic<bool> stop{false};
  auto result = std::async(std::launch::async, [&] { return RunSupervisor(job.o, &stop); });
  const json started = WaitForEvent(
      job.o.run_dir, [](const json& e) { return e["event"] == "agent_start" && e["node"] == 1; });
  ASSERT_FALSE(started.is_null()) << "no agent_start for node 1";
  ASSERT_FALSE(WaitForEvent(job.o.run_dir, [](const json& e) {
                 return e["event"] == "attempt_start";
               }).is_null());
  ASSERT_EQ(kill(started["pid"].get<pid_t>(), SIGKILL), 0);
  std::ofstream(job.plan() + ".go") << "go\n";
  Status s = result.get();
  ASSERT_TRUE(s.ok()) << s.ToString();
  const std::vector<json> ev = job.events();
  ASSERT_EQ(OfKind(ev, "agent_lost").size(), 1u);
  EXPECT_EQ(OfKind(ev, "agent_lost")[0]["node"], 1);
  const std::vector<json> rebuilds = OfKind(ev, "agent_rebuild");
  ASSERT_EQ(rebuilds.size(), 1u);
  EXPECT_FALSE(rebuilds[0]["ok"].get<bool>());  // no snapshot was ever written
  EXPECT_NE(rebuilds[0]["error"].get<std::string>().find("through mpirun on localhost: ERR"),
            std::string::npos)
      << rebuilds[0].dump();
  for (const json& e : OfKind(ev, "agent_stop")) {
    EXPECT_TRUE(e["shutdown_sent"].get<bool>()) << e.dump();
    EXPECT_FALSE(Alive(e["pid"].get<pid_t>()));
  }
  EXPECT_EQ(OfKind(ev, "agent_stop").size(), 2u);
  std::ifstream hosts_file(job.o.mpirun + ".hosts");
  std::set<std::string> hosts;
  for (std::string h; hosts_file >> h;) hosts.insert(h);
  EXPECT_EQ(hosts, (std::set<std::string>{"127.0.0.1", "localhost"}));
  EXPECT_EQ(OfKind(ev, "attempt_end").back()["reason"], "finished");
  job.ExpectNoOrphans();
}

// `tandem run` itself: SIGTERM mid-attempt stops the job and the agent, exit code 130.
TEST(Supervisor, SigtermToTandemRunStopsJobAndAgents) {
  ASSERT_TRUE(std::filesystem::exists(TandemBinary())) << TandemBinary() << ": build `tandem`";
  FakeJob job({"hang"});
  const std::vector<std::string> args = {
      TandemBinary(), "run",      "--launcher", "local",        "--np", "2",  "--run-dir",
      job.o.run_dir,  "--tandem", job.o.tandem, "--kill-grace", "1",    "--", job.plan()};
  const pid_t pid = fork();
  if (pid == 0) {
    std::vector<char*> argv;
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  ASSERT_GT(pid, 0);
  const json started =
      WaitForEvent(job.o.run_dir, [](const json& e) { return e["event"] == "attempt_start"; });
  ASSERT_FALSE(started.is_null());
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!std::filesystem::exists(job.o.run_dir + "/heartbeat") &&
         std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_EQ(kill(pid, SIGTERM), 0);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 130) << "wait status " << status;
  const std::vector<json> ev = job.events();
  ASSERT_EQ(OfKind(ev, "attempt_end").size(), 1u);
  EXPECT_NE(OfKind(ev, "attempt_end")[0]["reason"].get<std::string>().find("interrupted"),
            std::string::npos);
  const std::vector<json> stops = OfKind(ev, "agent_stop");
  ASSERT_EQ(stops.size(), 1u);  // one node: one agent, alone
  EXPECT_TRUE(stops[0]["shutdown_sent"].get<bool>());
  EXPECT_FALSE(Alive(stops[0]["pid"].get<pid_t>()));
  job.ExpectNoOrphans();
}

TEST(Supervisor, RealMpirunFailureIsRelaunched) {
  if (std::system("command -v mpirun > /dev/null 2>&1") != 0) GTEST_SKIP() << "no mpirun";
  FakeJob job({"fail", "ok"});
  job.o.launcher = Launcher::kMpirun;
  job.o.hang_timeout_s = 10;
  Status s = RunSupervisor(job.o, nullptr);
  ASSERT_TRUE(s.ok()) << s.ToString();
  const std::vector<json> ends = OfKind(job.events(), "attempt_end");
  ASSERT_EQ(ends.size(), 2u);
  EXPECT_EQ(ends[0]["reason"].get<std::string>().rfind("mpirun ended with", 0), 0u)
      << ends[0].dump();
  EXPECT_EQ(ends[1]["reason"], "finished");
  EXPECT_EQ(job.RecordedPids().size(), 8u);  // 2 attempts x 2 ranks x (rank, child)
  job.ExpectNoOrphans();
}

TEST(SupervisorArgs, SlurmNodeListsAndHostfiles) {
  auto hosts = ExpandSlurmNodeList("gpu[01-03,7],cpu5,n[8-9]x");
  ASSERT_TRUE(hosts.ok()) << hosts.status().ToString();
  EXPECT_EQ(*hosts,
            (std::vector<std::string>{"gpu01", "gpu02", "gpu03", "gpu7", "cpu5", "n8x", "n9x"}));
  EXPECT_FALSE(ExpandSlurmNodeList("gpu[3-1]").ok());
  EXPECT_FALSE(ExpandSlurmNodeList("gpu[1-2").ok());
  TempDir dir;
  std::ofstream(dir.Join("hosts")) << "# comment\nnodeA slots=4\nnodeB slots=4\nnodeA\n";
  auto from_file = ReadHostfile(dir.Join("hosts"));
  ASSERT_TRUE(from_file.ok()) << from_file.status().ToString();
  EXPECT_EQ(*from_file, (std::vector<std::string>{"nodeA", "nodeB"}));
  EXPECT_FALSE(ReadHostfile(dir.Join("missing")).ok());
}

TEST(SupervisorArgs, MpirunCommandAndValidation) {
  SupervisorOptions o;
  o.np = 8;
  o.ranks_per_node = 4;
  o.hosts = {"a", "b"};
  o.hostfile = "hf";
  o.run_dir = "/r";
  o.tandem = "/bin/tandem";
  o.agent_binary = "/bin/tandem";
  o.job = {"c.toml", "--set", "x=1"};
  ASSERT_TRUE(ValidateOptions(o).ok()) << ValidateOptions(o).ToString();
  std::string line;
  for (const std::string& w : MpirunArgv(o)) line += w + " ";
  EXPECT_NE(line.find("mpirun -np 8 "), std::string::npos) << line;
  EXPECT_NE(line.find("--hostfile hf --map-by ppr:4:node -x TANDEM_ATTEMPT /bin/tandem train "
                      "c.toml --set x=1 --resume --set snapshot.agent_socket=/r/agents/"
                      "node{node}.sock --set snapshot.ranks_per_node=4 --set "
                      "train.heartbeat_file=/r/heartbeat "),
            std::string::npos)
      << line;
  EXPECT_EQ(line.find("--oversubscribe"), std::string::npos) << line;
  o.np = 6;  // not a multiple of 4
  EXPECT_FALSE(ValidateOptions(o).ok());
  o.np = 12;  // 3 nodes, 2 hosts
  EXPECT_FALSE(ValidateOptions(o).ok());
  o.hosts = {"a", "b", "c"};
  o.k = 1;  // k + m = 2 != 3 nodes
  EXPECT_FALSE(ValidateOptions(o).ok());
  o.k = 0;
  EXPECT_TRUE(ValidateOptions(o).ok());
  o.run_dir.clear();
  EXPECT_FALSE(ValidateOptions(o).ok());
}

}  // namespace
}  // namespace tandem::launch::internal
