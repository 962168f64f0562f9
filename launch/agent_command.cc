// `tandem agent`: the per-node snapshot agent (checkpoint/agent.h), until SHUTDOWN or a signal.
#include <signal.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <thread>

#include "checkpoint/agent.h"
#include "core/logging.h"
#include "launch/commands.h"

namespace tandem::launch {
namespace {

void PrintAgentHelp() {
  std::printf(
      "usage: tandem agent --socket PATH [--node N --group host:port,host:port,...] [options]\n\n"
      "Runs the node's snapshot agent: holds trainers' snapshots in shared memory and, with a\n"
      "group of k+m agents, erasure-codes them across nodes over libfabric.\n\n"
      "options:\n"
      "  --socket PATH             Unix socket trainers connect to (required)\n"
      "  --node N                  this node's index in --group (default 0)\n"
      "  --group LIST              host:port of every agent, by node; omit to run alone\n"
      "  --k K --m M               data and parity fragments (default k = group size - m, m = 1)\n"
      "  --provider NAME           libfabric provider between agents (default tcp)\n"
      "  --rate-limit BYTES_PER_S  pace of parity traffic (default 0 = unlimited)\n"
      "  --peer-timeout S          every wait on a peer agent (default 30)\n"
      "  --heartbeat-timeout S     a rank silent this long is reported dead (default 10)\n"
      "  --shm-prefix NAME         shared-memory name prefix (default derived from uid and node)\n"
      "  --log-level LEVEL         debug, info, warning, error (default info)\n"
      "  --test-hooks              serve TEST_CORRUPT (fault tests only)\n");
}

// Parses "--flag value" pairs into options; returns false (after printing why) on a bad one.
bool ParseAgentArgs(const Args& args, checkpoint::AgentOptions* o, bool* help) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      *help = true;
      return true;
    }
    if (a == "--test-hooks") {  // the only flag without a value
      o->test_hooks = true;
      continue;
    }
    if (i + 1 >= args.size()) {
      std::fprintf(stderr, "tandem agent: '%s' needs a value (see --help)\n", a.c_str());
      return false;
    }
    const std::string v = args[++i];
    char* end = nullptr;
    auto number = [&]() { return std::strtod(v.c_str(), &end); };
    if (a == "--socket") o->socket_path = v;
    else if (a == "--node") o->node = static_cast<int>(number());
    else if (a == "--k") o->k = static_cast<int>(number());
    else if (a == "--m") o->m = static_cast<int>(number());
    else if (a == "--provider") o->provider = v;
    else if (a == "--rate-limit") o->rate_limit_bytes_per_s = number();
    else if (a == "--peer-timeout") o->peer_timeout_s = number();
    else if (a == "--heartbeat-timeout") o->heartbeat_timeout_s = number();
    else if (a == "--shm-prefix") o->shm_prefix = v;
    else if (a == "--log-level") {
      StatusOr<LogLevel> level = ParseLogLevel(v);
      if (!level.ok()) {
        std::fprintf(stderr, "tandem agent: %s\n", level.status().message().c_str());
        return false;
      }
      LogOptions log;
      log.level = *level;
      SetLogOptions(log);
    } else if (a == "--group") {
      std::stringstream in(v);
      for (std::string item; std::getline(in, item, ',');) o->group.push_back(item);
    } else {
      std::fprintf(stderr, "tandem agent: unknown option '%s' (see --help)\n", a.c_str());
      return false;
    }
    if (end && *end != '\0') {
      std::fprintf(stderr, "tandem agent: %s expects a number, found '%s'\n", a.c_str(), v.c_str());
      return false;
    }
  }
  if (o->socket_path.empty()) {
    std::fprintf(stderr, "tandem agent: --socket PATH is required (see --help)\n");
    return false;
  }
  return true;
}

// The process-wide stop request of the signal handler (lock-free, so async-signal-safe).
std::atomic<bool>& StopFlag() {
  static std::atomic<bool> stop{false};
  return stop;
}

}  // namespace

int AgentCommand(const Args& args) {
  checkpoint::AgentOptions options;
  bool help = false;
  if (!ParseAgentArgs(args, &options, &help)) return 2;
  if (help) {
    PrintAgentHelp();
    return 0;
  }
  // SIGTERM and SIGINT stop the agent cleanly (its shared memory is unlinked). Libraries the
  // binary links start threads before main (OpenBLAS, OpenMP), so a signal may land on any
  // thread: a handler that only sets a flag works wherever it lands (RunAgent polls the flag).
  struct sigaction action {};
  action.sa_handler = [](int) { StopFlag().store(true); };
  sigemptyset(&action.sa_mask);
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);
  Status s = checkpoint::RunAgent(options, &StopFlag());
  if (!s.ok()) {
    std::fprintf(stderr, "tandem agent: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}

}  // namespace tandem::launch
