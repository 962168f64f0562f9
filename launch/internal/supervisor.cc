// RunSupervisor: attempts, failure detection, teardown, backoff and relaunch.
#include "launch/internal/supervisor.h"

#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <thread>

#include "launch/internal/agents.h"
#include "launch/internal/event_log.h"
#include "launch/internal/process.h"

namespace tandem::launch::internal {
namespace {

using nlohmann::json;

constexpr double kPollS = 0.1;

struct AttemptResult {
  bool finished = false;     // every process exited 0
  bool interrupted = false;  // *stop was set
  std::string reason;        // why it ended, for the log
  ExitInfo exit;             // mpirun's (or the first failed local rank's) end
  std::optional<long> step;  // last step in the heartbeat
};

std::string Join(const std::vector<std::string>& words) {
  std::string out;
  for (const std::string& w : words) out += (out.empty() ? "" : " ") + w;
  return out;
}

// Watches the heartbeat file: progress is any change of its content "<step> <unix time>".
class Heartbeat {
 public:
  explicit Heartbeat(std::string path) : path_(std::move(path)) {
    std::error_code ec;
    std::filesystem::remove(path_, ec);  // the previous attempt's beat is not progress
    last_change_ = MonotonicSeconds();
  }
  void Poll() {
    std::ifstream in(path_);
    std::string content;
    if (!in || !std::getline(in, content) || content == content_) return;
    content_ = content;
    last_change_ = MonotonicSeconds();
    long step = 0;
    if (std::istringstream(content) >> step) step_ = step;
  }
  double stale_s() const { return MonotonicSeconds() - last_change_; }
  bool seen() const { return !content_.empty(); }
  std::optional<long> step() const { return step_; }

 private:
  std::string path_;
  std::string content_;
  double last_change_ = 0;
  std::optional<long> step_;
};

class Supervisor {
 public:
  Supervisor(const SupervisorOptions& o, EventLog* log, const std::atomic<bool>* stop)
      : o_(o), log_(log), stop_(stop) {}

  Status Run();

 private:
  bool stopped() const { return stop_ && stop_->load(); }
  StatusOr<std::vector<pid_t>> Launch(int attempt, const std::string& log_path);
  AttemptResult Attempt(int attempt);
  // Checks the job's processes once; sets `r` and returns true when the attempt is over.
  bool CheckOnce(const std::vector<pid_t>& pids, std::vector<bool>* done, Heartbeat* beat,
                 AttemptResult* r);
  Status Finish(AgentSet* agents, Status result);

  const SupervisorOptions& o_;
  EventLog* log_;
  const std::atomic<bool>* stop_;
  double stopped_since_ = -1;  // when a stopped job process was first seen, -1 when none
  double next_stop_scan_ = 0;
};

StatusOr<std::vector<pid_t>> Supervisor::Launch(int attempt, const std::string& log_path) {
  const std::string attempt_env = StrCat("TANDEM_ATTEMPT=", attempt);
  if (o_.launcher == Launcher::kMpirun) {
    TANDEM_ASSIGN_OR_RETURN(pid_t pid, SpawnInSession(MpirunArgv(o_), {attempt_env}, log_path));
    return std::vector<pid_t>{pid};
  }
  const int r = o_.ranks_per_node > 0 ? o_.ranks_per_node : o_.np;
  std::vector<pid_t> pids;
  for (int rank = 0; rank < o_.np; ++rank) {
    StatusOr<pid_t> pid = SpawnInSession(
        TrainerArgv(o_),
        {attempt_env, StrCat("OMPI_COMM_WORLD_RANK=", rank), StrCat("OMPI_COMM_WORLD_SIZE=", o_.np),
         StrCat("OMPI_COMM_WORLD_LOCAL_RANK=", rank % r), StrCat("OMPI_COMM_WORLD_LOCAL_SIZE=", r),
         StrCat("OMPI_COMM_WORLD_NODE_RANK=", rank / r)},
        log_path);
    if (!pid.ok()) {
      KillSessions(pids, o_.kill_grace_s, nullptr);
      return pid.status();
    }
    pids.push_back(*pid);
  }
  return pids;
}

bool Supervisor::CheckOnce(const std::vector<pid_t>& pids, std::vector<bool>* done, Heartbeat* beat,
                           AttemptResult* r) {
  const bool local = o_.launcher == Launcher::kLocal;
  for (size_t i = 0; i < pids.size(); ++i) {
    ExitInfo info;
    if ((*done)[i] || !TryWait(pids[i], &info)) continue;
    (*done)[i] = true;
    if (!info.success()) {
      r->exit = info;
      r->reason = local ? StrCat("rank ", i, " (pid ", pids[i], ") ended with ", info.ToString())
                        : StrCat("mpirun ended with ", info.ToString());
      return true;
    }
  }
  if (std::all_of(done->begin(), done->end(), [](bool d) { return d; })) {
    r->finished = true;
    r->reason = "finished";
    return true;
  }
  beat->Poll();
  const double limit =
      beat->seen() || o_.startup_timeout_s <= 0 ? o_.hang_timeout_s : o_.startup_timeout_s;
  if (limit > 0 && beat->stale_s() > limit) {
    r->reason =
        StrCat("hung: ", o_.run_dir, "/heartbeat ", beat->seen() ? "unchanged" : "absent", " for ",
               static_cast<int>(beat->stale_s()), " s (",
               beat->seen() || o_.startup_timeout_s <= 0 ? "--hang-timeout " : "--startup-timeout ",
               limit, ")");
    return true;
  }
  const double now = MonotonicSeconds();
  if (now >= next_stop_scan_) {  // a SIGSTOPped process of the job (on this host)
    next_stop_scan_ = now + 0.5;
    std::vector<pid_t> stopped;
    for (pid_t sid : pids) {
      for (pid_t p : StoppedSessionMembers(sid)) stopped.push_back(p);
    }
    if (stopped.empty()) {
      stopped_since_ = -1;
    } else if (stopped_since_ < 0) {
      stopped_since_ = now;
    } else if (now - stopped_since_ >= o_.stopped_timeout_s) {
      r->reason = StrCat("hung: process ", stopped[0], " of the job stopped (SIGSTOP) for ",
                         static_cast<int>(now - stopped_since_), " s");
      return true;
    }
  }
  return false;
}

AttemptResult Supervisor::Attempt(int attempt) {
  AttemptResult r;
  const std::string log_path = StrCat(o_.run_dir, "/logs/attempt-", attempt, ".log");
  Heartbeat beat(StrCat(o_.run_dir, "/heartbeat"));
  const double start = UnixTime();
  StatusOr<std::vector<pid_t>> pids = Launch(attempt, log_path);
  if (!pids.ok()) {
    r.reason = StrCat("could not start: ", pids.status().message());
    r.exit.exited = true;
    r.exit.code = 127;
    log_->Emit("attempt_end",
               {{"attempt", attempt},
                {"start", start},
                {"end", UnixTime()},
                {"reason", r.reason},
                {"exit", r.exit.ToString()},
                {"exit_code", 127},
                {"log", log_path},
                {"steps_reached", nullptr}},
               StrCat("attempt ", attempt, " failed: ", r.reason));
    return r;
  }
  const std::vector<std::string> argv =
      o_.launcher == Launcher::kMpirun ? MpirunArgv(o_) : TrainerArgv(o_);
  log_->Emit("attempt_start",
             {{"attempt", attempt},
              {"start", start},
              {"pids", *pids},
              {"command", argv},
              {"log", log_path}},
             StrCat("attempt ", attempt, " started (",
                    pids->size() == 1 ? StrCat("pid ", pids->at(0)) : "pids " + json(*pids).dump(),
                    "): ", Join(argv), " > ", log_path));
  std::vector<bool> done(pids->size(), false);
  stopped_since_ = -1;
  while (!CheckOnce(*pids, &done, &beat, &r)) {
    if (stopped()) {
      r.interrupted = true;
      r.reason = "interrupted (SIGINT or SIGTERM to the supervisor)";
      break;
    }
    std::this_thread::sleep_for(std::chrono::duration<double>(kPollS));
  }
  std::vector<ExitInfo> infos;
  // Leftovers, whatever ended. Only a stop asked of the supervisor gives the ranks --kill-grace
  // to stop after their update and save (tandem train's SIGTERM handling); after a failure the
  // survivors wait in collectives that cannot finish, so they go at once (the snapshot has them).
  const int killed = KillSessions(*pids, r.interrupted ? o_.kill_grace_s : 0.0, &infos);
  if (r.finished) {
    r.exit.exited = true;  // every process exited 0
  } else if (r.reason.rfind("hung", 0) == 0 || r.interrupted) {
    for (size_t i = 0; i < pids->size(); ++i) {  // how the first killed process ended
      if (!done[i]) {
        r.exit = infos[i];
        break;
      }
    }
  }
  beat.Poll();
  r.step = beat.step();
  const double end = UnixTime();
  json fields = {{"attempt", attempt},
                 {"start", start},
                 {"end", end},
                 {"duration_s", end - start},
                 {"reason", r.reason},
                 {"exit", r.exit.ToString()},
                 {"sigkilled", killed},
                 {"log", log_path},
                 {"steps_reached", r.step ? json(*r.step) : json(nullptr)}};
  if (r.exit.exited)
    fields["exit_code"] = r.exit.code;
  else
    fields["signal"] = r.exit.signal;
  log_->Emit(
      "attempt_end", fields,
      StrCat("attempt ", attempt, " ",
             r.finished ? "finished" : (r.interrupted ? "stopped" : "failed"), ": ", r.reason,
             r.finished || r.exit.exited ? "" : StrCat(" (job ended by ", r.exit.ToString(), ")"),
             ", last step ", r.step ? std::to_string(*r.step) : std::string("none"), ", after ",
             static_cast<int>(end - start), " s (log ", log_path, ")"));
  return r;
}

Status Supervisor::Finish(AgentSet* agents, Status result) {
  if (agents) agents->ShutdownAll();
  log_->Emit("supervisor_end", {{"ok", result.ok()}, {"status", result.ToString()}},
             result.ok() ? "done: the job finished"
                         : StrCat("stopped (", StatusCodeName(result.code()), ")"));
  return result;
}

Status Supervisor::Run() {
  std::optional<AgentSet> agents;
  if (o_.agents) {
    agents.emplace(o_, log_);
    Status s = agents->StartAll();
    if (!s.ok()) return Finish(&*agents, s);
  }
  AgentSet* set = agents ? &*agents : nullptr;
  std::vector<std::string> failures;
  for (int attempt = 1;; ++attempt) {
    AttemptResult r = Attempt(attempt);
    if (r.interrupted) return Finish(set, AbortedError("interrupted: job and agents stopped"));
    if (r.finished) return Finish(set, Status::Ok());
    failures.push_back(StrCat("attempt ", attempt, ": ", r.reason, " (log ", o_.run_dir,
                              "/logs/attempt-", attempt, ".log)"));
    const int num_failures = static_cast<int>(failures.size());
    if (num_failures > o_.max_restarts) {
      std::string all;
      for (const std::string& f : failures) all += "\n  " + f;
      return Finish(set, UnavailableError(StrCat(
                             "the job failed ", num_failures, " times, more than --max-restarts ",
                             o_.max_restarts, "; last failure: ", failures.back(), all)));
    }
    if (set) {
      Status s = set->CheckAndRepair();
      if (!s.ok()) return Finish(set, s);
    }
    const double delay = std::min(o_.max_backoff_s, o_.backoff_s * std::pow(2.0, num_failures - 1));
    log_->Emit("restart",
               {{"next_attempt", attempt + 1},
                {"delay_s", delay},
                {"failures", num_failures},
                {"max_restarts", o_.max_restarts}},
               StrCat("relaunching in ", delay, " s as attempt ", attempt + 1, " (restart ",
                      num_failures, " of at most ", o_.max_restarts, ")"));
    const double until = MonotonicSeconds() + delay;
    while (MonotonicSeconds() < until) {
      if (stopped()) return Finish(set, AbortedError("interrupted during the backoff"));
      std::this_thread::sleep_for(std::chrono::duration<double>(kPollS));
    }
  }
}

}  // namespace

Status RunSupervisor(const SupervisorOptions& o, const std::atomic<bool>* stop) {
  TANDEM_RETURN_IF_ERROR(ValidateOptions(o));
  std::error_code ec;
  std::filesystem::create_directories(o.run_dir + "/logs", ec);
  if (ec) return UnavailableError(StrCat("cannot create '", o.run_dir, "/logs': ", ec.message()));
  TANDEM_ASSIGN_OR_RETURN(EventLog log, EventLog::Open(o.run_dir + "/supervisor.jsonl"));
  log.Emit("supervisor_start",
           {{"np", o.np},
            {"ranks_per_node", o.ranks_per_node > 0 ? o.ranks_per_node : o.np},
            {"nodes", NumNodes(o)},
            {"hosts", o.hosts},
            {"launcher", o.launcher == Launcher::kMpirun ? "mpirun" : "local"},
            {"agents", o.agents},
            {"k", o.k},
            {"m", o.m},
            {"max_restarts", o.max_restarts},
            {"hang_timeout_s", o.hang_timeout_s},
            {"run_dir", o.run_dir}},
           StrCat("supervising ", o.np, " ranks on ", NumNodes(o), " node(s), run dir ", o.run_dir,
                  ", at most ", o.max_restarts, " restarts"));
  Supervisor supervisor(o, &log, stop);
  return supervisor.Run();
}

}  // namespace tandem::launch::internal
