// The supervisor's pure parts: option checks, the mpirun and trainer command lines, Slurm node
// lists and hostfiles.
#include <unistd.h>

#include <fstream>
#include <set>
#include <sstream>

#include "launch/internal/supervisor.h"

namespace tandem::launch::internal {
namespace {

// Splits at commas outside brackets: "a[1,2],b" -> "a[1,2]", "b".
std::vector<std::string> SplitTopLevel(const std::string& list) {
  std::vector<std::string> out;
  std::string cur;
  int depth = 0;
  for (char c : list) {
    if (c == '[') ++depth;
    if (c == ']') --depth;
    if (c == ',' && depth == 0) {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

// Expands one name with bracket groups, appending to `out`.
Status ExpandName(const std::string& name, std::vector<std::string>* out) {
  const size_t open = name.find('[');
  if (open == std::string::npos) {
    out->push_back(name);
    return Status::Ok();
  }
  const size_t close = name.find(']', open);
  if (close == std::string::npos) {
    return InvalidArgumentError(StrCat("Slurm node list: '[' without ']' in '", name, "'"));
  }
  const std::string prefix = name.substr(0, open), rest = name.substr(close + 1);
  std::stringstream ranges(name.substr(open + 1, close - open - 1));
  for (std::string range; std::getline(ranges, range, ',');) {
    const size_t dash = range.find('-');
    const std::string lo = range.substr(0, dash);
    const std::string hi = dash == std::string::npos ? lo : range.substr(dash + 1);
    if (lo.empty() || hi.empty() || lo.find_first_not_of("0123456789") != std::string::npos ||
        hi.find_first_not_of("0123456789") != std::string::npos || std::stol(hi) < std::stol(lo)) {
      return InvalidArgumentError(
          StrCat("Slurm node list: expected N or N-M in '", name, "', found '", range, "'"));
    }
    for (long i = std::stol(lo); i <= std::stol(hi); ++i) {
      std::string num = std::to_string(i);
      if (num.size() < lo.size()) num.insert(0, lo.size() - num.size(), '0');  // zero padding
      TANDEM_RETURN_IF_ERROR(ExpandName(prefix + num + rest, out));
    }
  }
  return Status::Ok();
}

}  // namespace

int NumNodes(const SupervisorOptions& o) {
  const int r = o.ranks_per_node > 0 ? o.ranks_per_node : o.np;
  return r > 0 ? o.np / r : 1;
}

bool SingleHost(const SupervisorOptions& o) {
  return o.launcher == Launcher::kLocal || o.hosts.size() <= 1;
}

Status ValidateOptions(const SupervisorOptions& o) {
  const int r = o.ranks_per_node > 0 ? o.ranks_per_node : o.np;
  if (o.np < 1 || o.np % r != 0) {
    return InvalidArgumentError(
        StrCat("expected --np (", o.np, ") a positive multiple of ", "--ranks-per-node (", r, ")"));
  }
  if (o.run_dir.empty()) return InvalidArgumentError("--run-dir DIR is required");
  if (o.job.empty()) return InvalidArgumentError("expected the job after '--': CONFIG.toml [args]");
  if (o.max_restarts < 0 || o.backoff_s < 0 || o.hang_timeout_s < 0) {
    return InvalidArgumentError("expected --max-restarts, --backoff, --hang-timeout >= 0");
  }
  const int nodes = NumNodes(o);
  if (!SingleHost(o) && static_cast<int>(o.hosts.size()) < nodes) {
    return InvalidArgumentError(
        StrCat(nodes, " nodes of ", r, " ranks need ", nodes, " hosts, found ", o.hosts.size()));
  }
  if (o.agents && nodes > 1 && o.m > 0) {
    const int k = o.k > 0 ? o.k : nodes - o.m;
    if (k < 1 || k + o.m != nodes) {
      return InvalidArgumentError(
          StrCat("expected --k + --m == nodes (", nodes, "), found k=", k, " m=", o.m));
    }
  }
  if (o.tandem.empty() || (o.agents && o.agent_binary.empty())) {
    return InvalidArgumentError("expected the tandem binary's path (--tandem)");
  }
  return Status::Ok();
}

std::vector<std::string> TrainerArgv(const SupervisorOptions& o) {
  std::vector<std::string> argv = {o.tandem, "train"};
  argv.insert(argv.end(), o.job.begin(), o.job.end());
  argv.push_back("--resume");
  if (o.agents) {
    const int r = o.ranks_per_node > 0 ? o.ranks_per_node : o.np;
    argv.insert(argv.end(),
                {"--set", StrCat("snapshot.agent_socket=", o.run_dir, "/agents/node{node}.sock"),
                 "--set", StrCat("snapshot.ranks_per_node=", r)});
  }
  argv.insert(argv.end(), {"--set", StrCat("train.heartbeat_file=", o.run_dir, "/heartbeat")});
  return argv;
}

std::vector<std::string> MpirunArgv(const SupervisorOptions& o) {
  std::vector<std::string> argv = {o.mpirun, "-np", std::to_string(o.np)};
  if (geteuid() == 0) argv.push_back("--allow-run-as-root");
  if (!o.hostfile.empty()) argv.insert(argv.end(), {"--hostfile", o.hostfile});
  if (SingleHost(o)) {
    argv.push_back("--oversubscribe");  // emulated nodes share this host's cores
  } else {
    const int r = o.ranks_per_node > 0 ? o.ranks_per_node : o.np;
    argv.insert(argv.end(), {"--map-by", StrCat("ppr:", r, ":node")});  // node = rank / R
  }
  argv.insert(argv.end(), {"-x", "TANDEM_ATTEMPT"});
  argv.insert(argv.end(), o.mpirun_args.begin(), o.mpirun_args.end());
  const std::vector<std::string> trainer = TrainerArgv(o);
  argv.insert(argv.end(), trainer.begin(), trainer.end());
  return argv;
}

StatusOr<std::vector<std::string>> ExpandSlurmNodeList(const std::string& list) {
  std::vector<std::string> out;
  for (const std::string& item : SplitTopLevel(list))
    TANDEM_RETURN_IF_ERROR(ExpandName(item, &out));
  if (out.empty()) return InvalidArgumentError(StrCat("empty Slurm node list '", list, "'"));
  return out;
}

StatusOr<std::vector<std::string>> ReadHostfile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return NotFoundError(StrCat("cannot read hostfile '", path, "'"));
  std::vector<std::string> hosts;
  std::set<std::string> seen;
  for (std::string line; std::getline(in, line);) {
    line = line.substr(0, line.find('#'));
    std::istringstream words(line);
    std::string host;
    if (words >> host && seen.insert(host).second) hosts.push_back(host);
  }
  if (hosts.empty()) return InvalidArgumentError(StrCat("hostfile '", path, "' names no host"));
  return hosts;
}

}  // namespace tandem::launch::internal
