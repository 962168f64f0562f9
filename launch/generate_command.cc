// `tandem generate`: continue a prompt with a model directory (and optionally a LoRA adapter).
#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <type_traits>
#include <utility>

#include "launch/commands.h"
#include "launch/internal/generate.h"

namespace tandem::launch {
namespace {

void PrintGenerateHelp() {
  std::printf(
      "usage: tandem generate --model DIR --prompt TEXT [options]\n\n"
      "Prints the model's continuation of the prompt (a demo and a quick check; no KV cache).\n\n"
      "options:\n"
      "  --model DIR          config.json + model.safetensors, e.g. runs/NAME/checkpoints/step-N\n"
      "  --adapter DIR        a PEFT LoRA adapter for the model (adapter_config.json + weights)\n"
      "  --tokenizer SPEC     byte, or a tokenizer.json (default: DIR/tokenizer.json if present,\n"
      "                       else byte)\n"
      "  --prompt TEXT        the text to continue (after the tokenizer's BOS, if any)\n"
      "  --max-tokens N       tokens to generate at most (default 64)\n"
      "  --temperature T      0 = greedy (default 0)\n"
      "  --top-k K            sample only from the K most likely tokens (default 0 = all)\n"
      "  --top-p P            nucleus sampling mass in (0, 1] (default 1.0)\n"
      "  --seed S             sampling seed (default 0)\n"
      "  --device D           cpu or cuda:N (default cpu)\n"
      "  --stop TEXT          stop when the continuation contains TEXT (not printed)\n"
      "  --ignore-eos         keep generating past the end-of-sequence token\n");
}

int UsageError(const std::string& message) {
  std::fprintf(stderr, "tandem generate: %s (see tandem generate --help)\n", message.c_str());
  return 2;
}

// Parses the whole of `text` as a number of type T (int64_t, uint64_t or float).
template <typename T>
bool ParseNumber(const std::string& text, T* out) {
  try {
    size_t used = 0;
    if constexpr (std::is_same_v<T, float>) {
      *out = std::stof(text, &used);
    } else if constexpr (std::is_same_v<T, uint64_t>) {
      if (text.empty() || text[0] == '-') return false;
      *out = std::stoull(text, &used);
    } else {
      *out = std::stoll(text, &used);
    }
    return used == text.size();
  } catch (const std::exception&) {
    return false;
  }
}

// Fills `o` from the arguments; returns an error message for bad usage, "" when fine.
std::string ParseArgs(const Args& args, GenerateOptions* o, bool* help) {
  bool have_prompt = false;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& flag = args[i];
    if (flag == "--help" || flag == "-h") {
      *help = true;
      return "";
    }
    if (flag == "--ignore-eos") {
      o->ignore_eos = true;
      continue;
    }
    if (i + 1 >= args.size()) return "unexpected argument '" + flag + "' (or it lacks a value)";
    const std::string& value = args[++i];
    const std::pair<const char*, std::string*> text_flags[] = {
        {"--model", &o->model_dir}, {"--adapter", &o->adapter_dir}, {"--tokenizer", &o->tokenizer},
        {"--prompt", &o->prompt},   {"--stop", &o->stop},           {"--device", &o->device}};
    bool known = false, ok = true;
    for (const auto& [name, field] : text_flags) {
      if (flag != name) continue;
      *field = value;
      known = true;
    }
    have_prompt = have_prompt || flag == "--prompt";
    if (flag == "--max-tokens") {
      ok = ParseNumber(value, &o->max_tokens) && o->max_tokens >= 0;
    } else if (flag == "--temperature") {
      ok = ParseNumber(value, &o->sampling.temperature);
    } else if (flag == "--top-k") {
      ok = ParseNumber(value, &o->sampling.top_k);
    } else if (flag == "--top-p") {
      ok = ParseNumber(value, &o->sampling.top_p);
    } else if (flag == "--seed") {
      ok = ParseNumber(value, &o->seed);
    } else if (!known) {
      return "unexpected argument '" + flag + "'";
    }
    if (!ok) return flag + ": '" + value + "' is not a valid value";
  }
  if (o->model_dir.empty()) return "--model DIR is required";
  if (!have_prompt) return "--prompt TEXT is required";
  Status s = ValidateSamplingParams(o->sampling);
  if (!s.ok()) return s.message();
  return "";
}

}  // namespace

int GenerateCommand(const Args& args) {
  GenerateOptions options;
  bool help = false;
  const std::string usage_error = ParseArgs(args, &options, &help);
  if (help) {
    PrintGenerateHelp();
    return 0;
  }
  if (!usage_error.empty()) return UsageError(usage_error);
  StatusOr<std::string> text = RunGenerate(options);
  if (!text.ok()) {
    std::fprintf(stderr, "tandem generate: %s\n", text.status().message().c_str());
    return 1;
  }
  std::fwrite(text->data(), 1, text->size(), stdout);
  std::fputc('\n', stdout);
  return 0;
}

}  // namespace tandem::launch
