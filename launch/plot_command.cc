#include <cstdio>
#include <string>

#include "launch/commands.h"
#include "trainer/plot.h"

namespace tandem::launch {

int PlotCommand(const Args& args) {
  if (args.empty() || args[0] == "--help" || args[0] == "-h") {
    std::printf("usage: tandem plot RUN_DIR [--out FILE.png]\n"
                "Draws loss (and eval loss), tokens/s and lr against the step from RUN_DIR/metrics.jsonl\n"
                "into RUN_DIR/plot.png (or FILE.png).\n");
    return args.empty() ? 2 : 0;
  }
  const std::string run_dir = args[0];
  std::string out = run_dir + "/plot.png";
  for (size_t i = 1; i < args.size(); ++i) {
    if (args[i] == "--out" && i + 1 < args.size()) {
      out = args[++i];
      continue;
    }
    std::fprintf(stderr, "tandem plot: unexpected argument '%s'\n", args[i].c_str());
    return 2;
  }
  Status s = trainer::PlotRun(run_dir, out);
  if (!s.ok()) {
    std::fprintf(stderr, "tandem plot: %s\n", s.message().c_str());
    return 1;
  }
  std::printf("wrote %s\n", out.c_str());
  return 0;
}

}  // namespace tandem::launch
