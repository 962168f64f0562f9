// Subcommands of the `tandem` command. Each takes its arguments (after the subcommand name) and
// returns a process exit code; errors are printed as "tandem <cmd>: <message>".
#pragma once

#include <string>
#include <vector>

namespace tandem::launch {

using Args = std::vector<std::string>;

int TrainCommand(const Args& args);
int DataCommand(const Args& args);
int PlotCommand(const Args& args);
int LogitsCommand(const Args& args);
int GenerateCommand(const Args& args);
int AgentCommand(const Args& args);
int CkptCommand(const Args& args);
int ServeCommand(const Args& args);
// `tandem run` / `tandem-run`: the job supervisor (launch/internal/supervisor.h).
int RunCommand(const Args& args);

}  // namespace tandem::launch
