// `tandem run` (also installed as `tandem-run`): supervise a training job with snapshot agents,
// relaunching it after failures (launch/internal/supervisor.h, docs/operations.md).
#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>

#include "checkpoint/agent.h"
#include "launch/commands.h"
#include "launch/internal/supervisor.h"

namespace tandem::launch {
namespace {

using internal::SupervisorOptions;

void PrintRunHelp() {
  std::printf(
      "usage: tandem run [options] -- CONFIG.toml [tandem train args...]\n"
      "       tandem-run [options] -- CONFIG.toml [tandem train args...]\n\n"
      "Starts one snapshot agent per node, runs `tandem train CONFIG ... --resume` under mpirun\n"
      "and relaunches it after any failure (a rank or mpirun dying, a stale heartbeat, a stopped\n"
      "rank) with the same run directory, up to --max-restarts times. Events go to stderr and\n"
      "RUN_DIR/supervisor.jsonl; attempt N's output to RUN_DIR/logs/attempt-N.log.\n\n"
      "options:\n"
      "  --run-dir DIR          agents' sockets, logs, heartbeat, supervisor.jsonl (required)\n"
      "  --np N                 total ranks (default: $SLURM_NTASKS)\n"
      "  --ranks-per-node R     ranks per node (default: $SLURM_NTASKS_PER_NODE, else N)\n"
      "  --hostfile FILE        mpirun hostfile; its hosts, in order, are the nodes\n"
      "                         (default: the nodes of $SLURM_JOB_NODELIST; else this host)\n"
      "  --max-restarts N       relaunches after failures (default 5)\n"
      "  --backoff S            delay before the first relaunch, doubled each time (default 2)\n"
      "  --max-backoff S        cap of the delay (default 60)\n"
      "  --hang-timeout S       heartbeat unchanged this long = hung (default 600; 0 = off)\n"
      "  --startup-timeout S    allowance before an attempt's first heartbeat (default: hang)\n"
      "  --stopped-timeout S    a rank of this host stopped (SIGSTOP) this long = hung (default "
      "5)\n"
      "  --kill-grace S         SIGTERM to SIGKILL when tearing a job down (default 5)\n"
      "  --k K --m M            erasure coding across node agents (default m = 1, k = nodes - m;\n"
      "                         m = 0 or one node: agents run alone)\n"
      "  --no-agents            no snapshot agents (resume from universal checkpoints only)\n"
      "  --agent-port P         multi-host agents listen on P + node (default 29600)\n"
      "  --agent-timeout S      agent start, REBUILD and SHUTDOWN deadline (default 30)\n"
      "  --mpirun PATH          (default mpirun)\n"
      "  --mpirun-args \"...\"    extra mpirun arguments, split at spaces\n"
      "  --tandem PATH          the program ranks run (default: this tandem binary)\n"
      "  --agent-bin PATH       the tandem binary that runs `agent` (default: this binary)\n"
      "  --launcher NAME        mpirun (default) or local: N plain child processes with Open\n"
      "                         MPI's OMPI_COMM_WORLD_* variables, for tests without MPI\n\n"
      "exit codes: 0 the job finished, 1 it failed more than --max-restarts times (or agents\n"
      "could not start), 2 bad usage, 130 stopped by SIGINT/SIGTERM/SIGHUP.\n");
}

// "4(x2),3" (Slurm's tasks per node) -> 4.
int LeadingInt(const char* text) { return text ? std::atoi(text) : 0; }

std::string ThisBinary() {
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string("tandem") : exe.string();
}

// Parses the options before "--" and the job after it. Returns 0 to go on, else an exit code.
int ParseRunArgs(const Args& args, SupervisorOptions* o) {
  std::map<std::string, std::string> v;
  size_t i = 0;
  for (; i < args.size() && args[i] != "--"; ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      PrintRunHelp();
      return -1;
    }
    if (a == "--no-agents") {
      o->agents = false;
      continue;
    }
    if (a.rfind("--", 0) != 0 || i + 1 >= args.size()) {
      std::fprintf(stderr,
                   "tandem run: expected an option with a value, found '%s' (see "
                   "--help; the job comes after '--')\n",
                   a.c_str());
      return 2;
    }
    v[a] = args[++i];
  }
  o->job.assign(args.begin() + std::min(args.size(), i + 1), args.end());
  auto take = [&](const char* name, auto* out) {
    auto it = v.find(name);
    if (it == v.end()) return true;
    std::istringstream in(it->second);
    if constexpr (std::is_same_v<std::decay_t<decltype(*out)>, std::string>) {
      *out = it->second;
    } else if (!(in >> *out) || !in.eof()) {
      std::fprintf(stderr, "tandem run: %s expects a number, found '%s'\n", name,
                   it->second.c_str());
      return false;
    }
    v.erase(it);
    return true;
  };
  std::string launcher = "mpirun", mpirun_args;
  const bool ok =
      take("--np", &o->np) && take("--ranks-per-node", &o->ranks_per_node) &&
      take("--hostfile", &o->hostfile) && take("--run-dir", &o->run_dir) &&
      take("--max-restarts", &o->max_restarts) && take("--backoff", &o->backoff_s) &&
      take("--max-backoff", &o->max_backoff_s) && take("--hang-timeout", &o->hang_timeout_s) &&
      take("--startup-timeout", &o->startup_timeout_s) && take("--kill-grace", &o->kill_grace_s) &&
      take("--stopped-timeout", &o->stopped_timeout_s) && take("--k", &o->k) &&
      take("--m", &o->m) && take("--agent-port", &o->agent_port) &&
      take("--agent-timeout", &o->agent_timeout_s) && take("--mpirun", &o->mpirun) &&
      take("--mpirun-args", &mpirun_args) && take("--tandem", &o->tandem) &&
      take("--agent-bin", &o->agent_binary) && take("--launcher", &launcher);
  if (!ok) return 2;
  if (!v.empty()) {  // every known option erased itself
    std::fprintf(stderr, "tandem run: unknown option '%s' (see --help)\n",
                 v.begin()->first.c_str());
    return 2;
  }
  std::istringstream words(mpirun_args);
  for (std::string w; words >> w;) o->mpirun_args.push_back(w);
  if (launcher != "mpirun" && launcher != "local") {
    std::fprintf(stderr, "tandem run: --launcher expects mpirun or local, found '%s'\n",
                 launcher.c_str());
    return 2;
  }
  o->launcher = launcher == "local" ? internal::Launcher::kLocal : internal::Launcher::kMpirun;
  return 0;
}

// Fills what the command line left open from Slurm, the hostfile and this binary.
Status Complete(SupervisorOptions* o, bool np_given, bool r_given) {
  const char* nodelist = std::getenv("SLURM_JOB_NODELIST");
  if (!o->hostfile.empty()) {
    o->hostfile = std::filesystem::absolute(o->hostfile).lexically_normal();
    TANDEM_ASSIGN_OR_RETURN(o->hosts, internal::ReadHostfile(o->hostfile));
  } else if (nodelist && o->launcher == internal::Launcher::kMpirun) {
    TANDEM_ASSIGN_OR_RETURN(o->hosts, internal::ExpandSlurmNodeList(nodelist));
  }
  if (!np_given) o->np = LeadingInt(std::getenv("SLURM_NTASKS"));
  if (!r_given) o->ranks_per_node = LeadingInt(std::getenv("SLURM_NTASKS_PER_NODE"));
  if (o->np <= 0) return InvalidArgumentError("expected --np N (or $SLURM_NTASKS)");
  if (o->tandem.empty()) o->tandem = ThisBinary();
  if (o->agent_binary.empty()) o->agent_binary = ThisBinary();
  if (!o->run_dir.empty()) o->run_dir = std::filesystem::absolute(o->run_dir).lexically_normal();
  return Status::Ok();
}

// `tandem run --agent-request SOCKET LATEST|REBUILD|SHUTDOWN [TIMEOUT_S]`: one request to the
// agent of this node, for a supervisor on another host (it runs this through `mpirun -np 1
// --host H`). Prints one line: "OK <v>", "NONE <why>" or "ERR <message>"; exit 0 when the agent
// answered OK or NONE.
int AgentRequest(const Args& args) {
  if (args.size() < 3) {
    std::fprintf(stderr, "tandem run: --agent-request SOCKET LATEST|REBUILD|SHUTDOWN [TIMEOUT]\n");
    return 2;
  }
  const double timeout_s = args.size() > 3 ? std::atof(args[3].c_str()) : 30;
  auto client = checkpoint::AgentClient::Connect(args[1], std::min(timeout_s, 5.0));
  Status s = client.status();
  std::string reply;
  if (client.ok()) {
    client->timeout_s = timeout_s;
    if (args[2] == "LATEST") {
      std::string why;
      auto v = client->LatestComplete(&why);
      s = v.status();
      if (v.ok()) reply = *v ? StrCat("OK ", **v) : StrCat("NONE ", why);
    } else if (args[2] == "REBUILD") {
      auto v = client->Rebuild();
      s = v.status();
      if (v.ok()) reply = StrCat("OK ", *v);
    } else if (args[2] == "SHUTDOWN") {
      s = client->Shutdown();
      reply = "OK";
    } else {
      s = InvalidArgumentError(StrCat("unknown agent request '", args[2], "'"));
    }
  }
  std::printf("%s\n", s.ok() ? reply.c_str() : StrCat("ERR ", s.message()).c_str());
  return s.ok() ? 0 : 1;
}

}  // namespace

int RunCommand(const Args& args) {
  if (!args.empty() && args[0] == "--agent-request") return AgentRequest(args);
  SupervisorOptions o;
  o.np = 0;
  const int parsed = ParseRunArgs(args, &o);
  if (parsed != 0) return parsed < 0 ? 0 : parsed;
  auto given = [&](const char* flag) {
    return std::find(args.begin(), args.end(), flag) != args.end();
  };
  Status s = Complete(&o, given("--np"), given("--ranks-per-node"));
  if (s.ok()) s = internal::ValidateOptions(o);
  if (!s.ok()) {
    std::fprintf(stderr, "tandem run: %s (see --help)\n", s.message().c_str());
    return 2;
  }
  // SIGINT, SIGTERM and SIGHUP stop the job and the agents cleanly: blocked here (and so in every
  // thread started later; children unblock them) and taken by one sigwait thread.
  sigset_t signals;
  sigemptyset(&signals);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&signals, sig);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  std::atomic<bool> stop{false};
  std::thread waiter([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    stop = true;
  });
  s = internal::RunSupervisor(o, &stop);
  const bool interrupted = stop.load();
  if (!interrupted) pthread_kill(waiter.native_handle(), SIGTERM);  // wake the waiter to end it
  waiter.join();
  if (s.ok()) return 0;
  std::fprintf(stderr, "tandem run: %s\n", s.message().c_str());
  return interrupted || s.code() == StatusCode::kAborted ? 130 : 1;
}

}  // namespace tandem::launch
