// Child processes of the supervisor (`tandem run`): each started in a session of its own so that
// it and everything it forks (mpirun, its ranks, their children) can be found and killed as one,
// whatever the terminal or the supervisor's own process group receive.
//
// Thread-safety: functions only; a ChildProcess is owned by one thread.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

#include "core/status.h"

namespace tandem::launch::internal {

// How a waited-for child ended.
struct ExitInfo {
  bool exited = false;  // false: killed by `signal`
  int code = 0;         // exit code when `exited`
  int signal = 0;       // terminating signal when !exited
  // "exit code 3" or "signal 9 (Killed)".
  std::string ToString() const;
  bool success() const { return exited && code == 0; }
};

// Starts argv[0] (a path, or a name looked up in PATH) with `argv` and the current environment
// plus `extra_env` ("NAME=value"), in a new session (setsid), stdout and stderr appended to
// `log_path` ("" keeps the supervisor's). Signals are unblocked in the child. Returns its pid,
// which is also its session and process-group id.
StatusOr<pid_t> SpawnInSession(const std::vector<std::string>& argv,
                               const std::vector<std::string>& extra_env,
                               const std::string& log_path);

// Non-blocking wait: the child's ExitInfo once it has ended (and is reaped), else false.
bool TryWait(pid_t pid, ExitInfo* info);

// Pids of the live processes (zombies excluded) whose session id is `sid`, from /proc.
std::vector<pid_t> SessionMembers(pid_t sid);
// Pids in session `sid` stopped by a signal (state 'T' in /proc/<pid>/stat).
std::vector<pid_t> StoppedSessionMembers(pid_t sid);
// True when `pid` exists and is not a zombie.
bool ProcessAlive(pid_t pid);

// Ends every process of each session: SIGTERM (and SIGCONT, so stopped processes see it), up to
// `grace_s` for them to exit, then SIGKILL until none is left. Direct children among `sids`
// are reaped; their ExitInfo goes to `infos` (same order, when not null and not reaped before).
// Returns the number of processes that needed SIGKILL.
int KillSessions(const std::vector<pid_t>& sids, double grace_s, std::vector<ExitInfo>* infos);

// Seconds since the epoch (wall clock, for logs) and a monotonic clock (for timeouts).
double UnixTime();
double MonotonicSeconds();

}  // namespace tandem::launch::internal
