#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "collectives/mpi.h"
#include "core/logging.h"
#include "launch/commands.h"
#include "launch/internal/stop_signals.h"
#include "trainer/config.h"
#include "trainer/trainer.h"

namespace tandem::launch {

namespace {

// Ranks of the job when started by mpirun (Open MPI, or a PMI launcher); 1 otherwise.
int LaunchedWorldSize() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"}) {
    if (const char* v = std::getenv(name)) return std::max(1, std::atoi(v));
  }
  return 1;
}

// A run stopped early by SIGTERM/SIGINT (after saving) exits 128 + the signal's number, as the
// shell reports a process the signal ended: a scheduler sees "not finished", nothing is lost.
int StoppedExitCode(const trainer::TrainResult& result) {
  return result.stopped_by_signal > 0 ? 128 + result.stopped_by_signal : 0;
}

// [parallel] One rank of an mpirun job: MPI, the host world, training, a timed finalize.
int TrainUnderMpi(const trainer::TrainConfig& config, const std::string& command_line) {
  collectives::CollectiveOptions options;
  options.timeout_s = config.parallel.timeout_s;
  StatusOr<collectives::MpiRuntime> mpi = collectives::MpiRuntime::Init(nullptr, nullptr, options);
  if (!mpi.ok()) {
    std::fprintf(stderr, "tandem train: %s\n", mpi.status().message().c_str());
    return 1;
  }
  LogOptions log;
  log.rank = mpi->world_rank();
  SetLogOptions(log);
  StatusOr<std::unique_ptr<collectives::Communicator>> world = collectives::CreateMpiWorld(options);
  if (!world.ok()) mpi->AbortJob(1, world.status().ToString());
  trainer::TrainEnv env;
  env.world = world->get();
  env.local_rank = mpi->local_rank();
  env.stop_signal = internal::InstallStopSignals();
  StatusOr<trainer::TrainResult> result = trainer::RunTraining(config, command_line, env);
  if (!result.ok()) {
    // A failed rank takes the job down at once rather than leaving peers to time out.
    mpi->AbortJob(1, StrCat("rank ", mpi->world_rank(), ": ", result.status().message()));
  }
  Status closed = (*world)->Close();
  Status finalized = mpi->Finalize();
  if (!closed.ok() || !finalized.ok()) {
    std::fprintf(stderr, "tandem train: rank %d: %s\n", mpi->world_rank(),
                 (!closed.ok() ? closed : finalized).message().c_str());
    return 1;
  }
  return StoppedExitCode(*result);
}

void PrintTrainHelp() {
  std::printf(
      "usage: tandem train [--config] FILE.toml [--set section.key=value ...] [--resume]\n\n"
      "Trains the model the config describes; `--set` overrides any key (repeatable).\n"
      "--resume continues from the newest universal checkpoint in train.out_dir when there is\n"
      "one (= --set train.resume=auto); the mesh may differ from the one that saved it.\n"
      "Examples: examples/tiny-cpu.toml (the demo), examples/llama-1b-full.toml.\n\n"
      "options (key, type, default, meaning):\n%s",
      trainer::TrainConfigHelp().c_str());
}
}  // namespace

int TrainCommand(const Args& args) {
  std::string config_path;
  std::vector<std::string> overrides;
  std::string command_line = "tandem train";
  for (size_t i = 0; i < args.size(); ++i) {
    command_line += " " + args[i];
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      PrintTrainHelp();
      return 0;
    }
    if ((a == "--config" || a == "--set") && i + 1 < args.size()) {
      command_line += " " + args[i + 1];
      if (a == "--config") {
        config_path = args[++i];
      } else {
        overrides.push_back(args[++i]);
      }
      continue;
    }
    if (a.rfind("--config=", 0) == 0) {
      config_path = a.substr(9);
      continue;
    }
    if (a.rfind("--set=", 0) == 0) {
      overrides.push_back(a.substr(6));
      continue;
    }
    if (a == "--resume") {
      overrides.push_back("train.resume=\"auto\"");
      continue;
    }
    if (a.rfind("--", 0) != 0 && config_path.empty()) {
      config_path = a;
      continue;
    }
    std::fprintf(stderr, "tandem train: unexpected argument '%s' (see tandem train --help)\n", a.c_str());
    return 2;
  }
  if (config_path.empty()) {
    std::fprintf(stderr, "tandem train: --config FILE.toml is required (see tandem train --help)\n");
    return 2;
  }
  StatusOr<trainer::TrainConfig> config = trainer::LoadTrainConfig(config_path, overrides);
  if (!config.ok()) {
    std::fprintf(stderr, "tandem train: %s\n", config.status().message().c_str());
    return 1;
  }
  if (LaunchedWorldSize() > 1) return TrainUnderMpi(*config, command_line);
  trainer::TrainEnv env;
  env.stop_signal = internal::InstallStopSignals();
  StatusOr<trainer::TrainResult> result = trainer::RunTraining(*config, command_line, env);
  if (!result.ok()) {
    std::fprintf(stderr, "tandem train: %s\n", result.status().message().c_str());
    return 1;
  }
  return StoppedExitCode(*result);
}

}  // namespace tandem::launch
