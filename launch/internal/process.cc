// Process helpers of the supervisor: spawning into a fresh session, /proc scans, group kills.
#include "launch/internal/process.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

extern char** environ;

namespace tandem::launch::internal {
namespace {

// argv[0] as an executable path: itself when it has a '/', else the first match in PATH.
std::string ResolveExecutable(const std::string& name) {
  if (name.find('/') != std::string::npos) return name;
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path ? path : "/usr/local/bin:/usr/bin:/bin");
  for (std::string dir; std::getline(dirs, dir, ':');) {
    const std::string candidate = (dir.empty() ? "." : dir) + "/" + name;
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return name;
}

// The environment with `extra` ("NAME=value") added, replacing variables of the same name.
std::vector<std::string> Environment(const std::vector<std::string>& extra) {
  std::vector<std::string> env;
  for (char** e = environ; e && *e; ++e) {
    const std::string var(*e);
    const std::string name = var.substr(0, var.find('='));
    bool replaced = false;
    for (const std::string& x : extra) replaced |= x.substr(0, x.find('=')) == name;
    if (!replaced) env.push_back(var);
  }
  env.insert(env.end(), extra.begin(), extra.end());
  return env;
}

std::vector<char*> CStrings(std::vector<std::string>& strings) {
  std::vector<char*> out;
  for (std::string& s : strings) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

// /proc/<pid>/stat's state letter and session id; false when the process is gone.
bool ReadStat(pid_t pid, char* state, pid_t* session) {
  std::ifstream in(StrCat("/proc/", pid, "/stat"));
  std::string line;
  if (!std::getline(in, line)) return false;
  const size_t close = line.rfind(')');  // the command name may hold spaces and parentheses
  if (close == std::string::npos) return false;
  std::istringstream rest(line.substr(close + 1));
  long ppid = 0, pgrp = 0, sid = 0;
  if (!(rest >> *state >> ppid >> pgrp >> sid)) return false;
  *session = static_cast<pid_t>(sid);
  return true;
}

template <class Pred>
std::vector<pid_t> ScanProc(Pred pred) {
  std::vector<pid_t> out;
  DIR* dir = opendir("/proc");
  if (!dir) return out;
  while (dirent* e = readdir(dir)) {
    char* end = nullptr;
    const long pid = std::strtol(e->d_name, &end, 10);
    if (pid <= 0 || *end != '\0') continue;
    char state = '?';
    pid_t sid = 0;
    if (ReadStat(static_cast<pid_t>(pid), &state, &sid) && pred(state, sid)) {
      out.push_back(static_cast<pid_t>(pid));
    }
  }
  closedir(dir);
  return out;
}

ExitInfo FromWaitStatus(int status) {
  ExitInfo info;
  info.exited = WIFEXITED(status);
  info.code = info.exited ? WEXITSTATUS(status) : 0;
  info.signal = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
  return info;
}

}  // namespace

std::string ExitInfo::ToString() const {
  if (exited) return StrCat("exit code ", code);
  return StrCat("signal ", signal, " (", strsignal(signal), ")");
}

StatusOr<pid_t> SpawnInSession(const std::vector<std::string>& argv,
                               const std::vector<std::string>& extra_env,
                               const std::string& log_path) {
  TANDEM_CHECK(!argv.empty());
  std::vector<std::string> args = argv;
  args[0] = ResolveExecutable(argv[0]);
  std::vector<std::string> env = Environment(extra_env);
  std::vector<char*> c_args = CStrings(args);
  std::vector<char*> c_env = CStrings(env);
  int log_fd = -1;
  if (!log_path.empty()) {
    log_fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log_fd < 0) {
      return UnavailableError(StrCat("cannot open log '", log_path, "': ", strerror(errno)));
    }
  }
  const int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
  int report[2];  // the child writes errno here when exec fails; EOF means exec succeeded
  if (pipe2(report, O_CLOEXEC) != 0) return InternalError(StrCat("pipe2: ", strerror(errno)));
  const pid_t pid = fork();
  if (pid == 0) {  // only async-signal-safe calls from here to exec
    setsid();
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    if (null_fd >= 0) dup2(null_fd, STDIN_FILENO);
    if (log_fd >= 0) {
      dup2(log_fd, STDOUT_FILENO);
      dup2(log_fd, STDERR_FILENO);
    }
    execve(c_args[0], c_args.data(), c_env.data());
    const int err = errno;
    (void)!write(report[1], &err, sizeof(err));
    _exit(127);
  }
  const int fork_errno = errno;
  close(report[1]);
  if (log_fd >= 0) close(log_fd);
  if (null_fd >= 0) close(null_fd);
  if (pid < 0) {
    close(report[0]);
    return InternalError(StrCat("fork for '", args[0], "': ", strerror(fork_errno)));
  }
  int child_errno = 0;
  const ssize_t n = read(report[0], &child_errno, sizeof(child_errno));
  close(report[0]);
  if (n == sizeof(child_errno)) {
    waitpid(pid, nullptr, 0);
    return NotFoundError(StrCat("cannot run '", args[0], "': ", strerror(child_errno)));
  }
  return pid;
}

bool TryWait(pid_t pid, ExitInfo* info) {
  int status = 0;
  const pid_t r = waitpid(pid, &status, WNOHANG);
  if (r != pid) return false;
  *info = FromWaitStatus(status);
  return true;
}

std::vector<pid_t> SessionMembers(pid_t sid) {
  return ScanProc([sid](char state, pid_t s) { return s == sid && state != 'Z' && state != 'X'; });
}

std::vector<pid_t> StoppedSessionMembers(pid_t sid) {
  return ScanProc([sid](char state, pid_t s) { return s == sid && state == 'T'; });
}

bool ProcessAlive(pid_t pid) {
  char state = '?';
  pid_t sid = 0;
  return ReadStat(pid, &state, &sid) && state != 'Z' && state != 'X';
}

int KillSessions(const std::vector<pid_t>& sids, double grace_s, std::vector<ExitInfo>* infos) {
  if (infos) infos->resize(sids.size());
  std::vector<bool> reaped(sids.size(), false);
  auto reap = [&] {
    for (size_t i = 0; i < sids.size(); ++i) {
      ExitInfo info;
      if (!reaped[i] && TryWait(sids[i], &info)) {
        reaped[i] = true;
        if (infos) (*infos)[i] = info;
      }
    }
  };
  auto members = [&] {
    reap();
    std::vector<pid_t> all;
    for (pid_t sid : sids) {
      for (pid_t p : SessionMembers(sid)) all.push_back(p);
    }
    return all;
  };
  for (pid_t p : members()) {
    kill(p, SIGTERM);
    kill(p, SIGCONT);
  }
  const double deadline = MonotonicSeconds() + grace_s;
  while (!members().empty() && MonotonicSeconds() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  int killed = 0;
  // SIGKILL until the sessions are empty: a member may fork between a scan and the kill.
  for (int round = 0; round < 100; ++round) {
    const std::vector<pid_t> left = members();
    if (left.empty()) break;
    for (pid_t p : left) killed += kill(p, SIGKILL) == 0 ? 1 : 0;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (size_t i = 0; i < sids.size(); ++i) {  // the direct children: reap them whatever happens
    int status = 0;
    if (!reaped[i] && waitpid(sids[i], &status, 0) == sids[i] && infos) {
      (*infos)[i] = FromWaitStatus(status);
    }
  }
  return killed;
}

double UnixTime() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

double MonotonicSeconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace tandem::launch::internal
