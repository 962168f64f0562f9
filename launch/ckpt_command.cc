// `tandem ckpt`: inspect universal checkpoints and convert them to and from HF formats.
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "checkpoint/universal.h"
#include "checkpoint/universal_hf.h"
#include "launch/commands.h"

namespace tandem::launch {
namespace {

constexpr char kUsage[] =
    "usage: tandem ckpt <action> ...\n"
    "  inspect FILE|DIR [--verify]      list meta, tensors, shapes, splits, steps, config\n"
    "                                   (--verify: read everything and check every CRC)\n"
    "  export-hf FILE|DIR OUT_DIR [--dtype f32|bf16|f16]\n"
    "                                   HF config.json + model.safetensors (default bf16)\n"
    "  import-hf MODEL_DIR OUT_FILE     checkpoint from a HF model, fresh optimizer state\n"
    "  export-adapter FILE|DIR OUT_DIR [--adapter NAME] [--dtype f32|bf16|f16]\n"
    "                                   an adapter in PEFT format (default f32)\n"
    "A DIR argument means the checkpoint its `latest` file names.\n";

// Splits positional arguments from "--key value" options (and bare "--verify").
Status ParseArgs(const Args& args, std::vector<std::string>* positional,
                 std::map<std::string, std::string>* options) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--verify") {
      (*options)[a].push_back('1');  // a flag; assigning "1" trips GCC 12 -Wrestrict
    } else if (a == "--dtype" || a == "--adapter") {
      if (i + 1 >= args.size()) return InvalidArgumentError(StrCat(a, " needs a value"));
      (*options)[a] = args[++i];
    } else if (a.rfind("--", 0) == 0) {
      return InvalidArgumentError(StrCat("unknown option '", a, "'"));
    } else {
      positional->push_back(a);
    }
  }
  return Status::Ok();
}

Status Run(const std::string& action, const std::vector<std::string>& pos,
           const std::map<std::string, std::string>& opt) {
  auto option = [&](const std::string& key, const std::string& def) {
    auto it = opt.find(key);
    return it == opt.end() ? def : it->second;
  };
  auto want = [&](size_t n) -> Status {
    if (pos.size() != n) {
      return InvalidArgumentError(
          StrCat(action, ": expected ", n, " arguments, found ", pos.size()));
    }
    return Status::Ok();
  };
  if (action == "inspect") {
    TANDEM_RETURN_IF_ERROR(want(1));
    TANDEM_ASSIGN_OR_RETURN(checkpoint::UniversalReader reader,
                            checkpoint::UniversalReader::Open(pos[0]));
    std::fputs(reader.Describe().c_str(), stdout);
    if (opt.count("--verify")) {
      TANDEM_RETURN_IF_ERROR(reader.VerifyAll());
      std::printf("verified: every dataset's CRC-32 matches\n");
    }
    return Status::Ok();
  }
  if (action == "export-hf") {
    TANDEM_RETURN_IF_ERROR(want(2));
    TANDEM_ASSIGN_OR_RETURN(DType dtype, ParseDType(option("--dtype", "bf16")));
    TANDEM_RETURN_IF_ERROR(checkpoint::ExportHf(pos[0], pos[1], dtype));
    std::printf("wrote %s/config.json and %s/model.safetensors\n", pos[1].c_str(), pos[1].c_str());
    return Status::Ok();
  }
  if (action == "import-hf") {
    TANDEM_RETURN_IF_ERROR(want(2));
    TANDEM_RETURN_IF_ERROR(checkpoint::ImportHf(pos[0], pos[1]));
    std::printf("wrote %s\n", pos[1].c_str());
    return Status::Ok();
  }
  if (action == "export-adapter") {
    TANDEM_RETURN_IF_ERROR(want(2));
    TANDEM_ASSIGN_OR_RETURN(DType dtype, ParseDType(option("--dtype", "f32")));
    TANDEM_RETURN_IF_ERROR(
        checkpoint::ExportAdapter(pos[0], option("--adapter", ""), pos[1], dtype));
    std::printf("wrote %s\n", pos[1].c_str());
    return Status::Ok();
  }
  return InvalidArgumentError(StrCat("unknown action '", action, "'"));
}

}  // namespace

int CkptCommand(const Args& args) {
  if (args.empty() || args[0] == "--help" || args[0] == "-h") {
    std::fputs(kUsage, args.empty() ? stderr : stdout);
    return args.empty() ? 2 : 0;
  }
  std::vector<std::string> positional;
  std::map<std::string, std::string> options;
  Status s = ParseArgs(Args(args.begin() + 1, args.end()), &positional, &options);
  if (s.ok()) s = Run(args[0], positional, options);
  if (!s.ok()) {
    std::fprintf(stderr, "tandem ckpt %s: %s\n", args[0].c_str(), s.message().c_str());
    if (s.code() == StatusCode::kInvalidArgument &&
        s.message().find("argument") != std::string::npos) {
      std::fputs(kUsage, stderr);
    }
    return s.code() == StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}

}  // namespace tandem::launch
