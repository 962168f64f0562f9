// The job supervisor behind `tandem run` / `tandem-run` (issue #8): starts one snapshot agent per
// node, launches the training job (under mpirun, or as local child processes), watches it, and on
// any failure (a rank or mpirun exiting non-zero or by a signal, a stale heartbeat, a stopped
// rank) kills the job's whole process tree, checks and restarts agents (REBUILD), waits a
// doubling backoff and relaunches with `--resume` and the same run directory, up to
// max_restarts times. Every decision goes to stderr and to <run_dir>/supervisor.jsonl.
//
// Every attempt runs (contract with the trainer, see docs/operations.md):
//   mpirun -np N [...] TANDEM train CONFIG [args] --resume
//     --set snapshot.agent_socket=<run_dir>/agents/node{node}.sock
//     --set snapshot.ranks_per_node=R --set train.heartbeat_file=<run_dir>/heartbeat
//
// Usage:
//   SupervisorOptions o;  o.np = 4; o.ranks_per_node = 2; o.run_dir = "runs/x"; o.job = {cfg};
//   Status s = RunSupervisor(o, &stop);  // OK: the job finished (exit 0 of mpirun)
//
// Thread-safety: RunSupervisor runs on one thread; `stop` may be set from any thread or a signal
// handler's thread. It forks and execs; it starts no threads.
#pragma once

#include <atomic>
#include <string>
#include <vector>

#include "core/status.h"

namespace tandem::launch::internal {

enum class Launcher {
  kMpirun,  // mpirun -np N ... (hostfile, Slurm allocation or this host)
  kLocal,   // N plain child processes with Open MPI's rank variables set (tests, no MPI)
};

struct SupervisorOptions {
  int np = 1;                      // total ranks
  int ranks_per_node = 0;          // R; 0 = np (one node)
  std::string hostfile;            // passed to mpirun; its hosts place the agents
  std::vector<std::string> hosts;  // one per node, in rank order (hostfile or Slurm)
  std::string run_dir;             // sockets, logs, heartbeat, supervisor.jsonl (required)
  int max_restarts = 5;            // relaunches allowed after failures
  double backoff_s = 2;            // delay before the first relaunch; doubles each time
  double max_backoff_s = 60;       // cap of the doubling delay
  double hang_timeout_s = 600;     // heartbeat unchanged this long = hung; 0 = off
  double startup_timeout_s = 0;    // before an attempt's first heartbeat; 0 = hang_timeout_s
  double stopped_timeout_s = 5;    // a rank stopped (SIGSTOP) this long = hung (local ranks)
  double kill_grace_s = 5;         // SIGTERM to SIGKILL
  int k = 0;                       // agents' data fragments; 0 = nodes - m
  int m = 1;                       // agents' parity fragments; 0 or one node: agents alone
  bool agents = true;              // false: no agents (--no-agents)
  int agent_port = 29600;          // multi-host agents listen on agent_port + node
  double agent_timeout_s = 30;     // agent start, REBUILD and SHUTDOWN deadlines
  Launcher launcher = Launcher::kMpirun;
  std::string mpirun = "mpirun";
  std::vector<std::string> mpirun_args;  // extra arguments, before the program
  std::string tandem;                    // the program ranks run (argv: tandem train CONFIG ...)
  std::string agent_binary;              // the `tandem` that runs `tandem agent`
  std::vector<std::string> job;          // CONFIG.toml [tandem train args...]
};

int NumNodes(const SupervisorOptions& o);
// True when the nodes are emulated on this host (no hosts, or a single one).
bool SingleHost(const SupervisorOptions& o);

// Checks the options (ranks divide into nodes, k + m == nodes, enough hosts, run dir set).
Status ValidateOptions(const SupervisorOptions& o);

// The trainer's argv (what each rank runs, the contract above) and mpirun's argv around it.
// Attempts differ only in $TANDEM_ATTEMPT.
std::vector<std::string> TrainerArgv(const SupervisorOptions& o);
std::vector<std::string> MpirunArgv(const SupervisorOptions& o);

// Expands a Slurm node list: "gpu[01-03,7],cpu5" -> gpu01 gpu02 gpu03 gpu7 cpu5.
StatusOr<std::vector<std::string>> ExpandSlurmNodeList(const std::string& list);
// The distinct hosts of an Open MPI hostfile ("host slots=N" lines, '#' comments), in order.
StatusOr<std::vector<std::string>> ReadHostfile(const std::string& path);

// Runs the job to completion or until it has failed max_restarts + 1 times. OK when the job
// finished; Aborted when *stop became true (job and agents stopped); Unavailable after too many
// failures, naming the last failure and the attempt logs.
Status RunSupervisor(const SupervisorOptions& o, const std::atomic<bool>* stop);

}  // namespace tandem::launch::internal
