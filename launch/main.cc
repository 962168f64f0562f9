// tandem: train, fine-tune and serve Llama models.
#include <cstdio>
#include <cstring>
#include <string>

#include "launch/commands.h"

namespace {

struct Command {
  const char* name;
  int (*run)(const tandem::launch::Args&);
  const char* summary;
};

constexpr Command kCommands[] = {
    {"train", tandem::launch::TrainCommand, "train or fine-tune a Llama model from a TOML config"},
    {"data", tandem::launch::DataCommand, "prepare token shards (prepare) or extract the Brown corpus (brown)"},
    {"plot", tandem::launch::PlotCommand, "draw a run's loss and throughput curves into a PNG"},
    {"logits", tandem::launch::LogitsCommand, "write a model's logits for given tokens (to compare frameworks)"},
    {"generate", tandem::launch::GenerateCommand, "continue a prompt with a model (and a LoRA adapter): a demo"},
    {"agent", tandem::launch::AgentCommand, "the per-node snapshot agent (shared memory, erasure coding across nodes)"},
    {"ckpt", tandem::launch::CkptCommand, "inspect universal checkpoints; export-hf, import-hf, export-adapter"},
    {"serve", tandem::launch::ServeCommand, "serve a model and its LoRA adapters over an OpenAI-compatible HTTP API"},
    {"run", tandem::launch::RunCommand, "supervise a training job: snapshot agents, relaunch after failures (tandem-run)"},
};

void PrintHelp() {
  std::printf("usage: tandem <command> [options]\n\ncommands:\n");
  for (const Command& c : kCommands) std::printf("  %-8s %s\n", c.name, c.summary);
  std::printf("\n`tandem <command> --help` lists a command's options with their defaults.\n");
}

}  // namespace

int main(int argc, char** argv) {
  // Installed as a link named `tandem-run`, the binary is `tandem run`.
  const char* slash = std::strrchr(argv[0], '/');
  if (std::strcmp(slash ? slash + 1 : argv[0], "tandem-run") == 0) {
    return tandem::launch::RunCommand(tandem::launch::Args(argv + 1, argv + argc));
  }
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "help")) {
    PrintHelp();
    return argc < 2 ? 2 : 0;
  }
  tandem::launch::Args args(argv + 2, argv + argc);
  for (const Command& c : kCommands) {
    if (std::strcmp(argv[1], c.name) == 0) return c.run(args);
  }
  std::fprintf(stderr, "tandem: unknown command '%s'\n\n", argv[1]);
  PrintHelp();
  return 2;
}
