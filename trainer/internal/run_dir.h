// The run directory of `tandem train`: resolved config, run facts, checkpoints.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "core/device.h"
#include "core/status.h"
#include "model/config.h"
#include "model/llama.h"
#include "model/tokenizer.h"
#include "trainer/config.h"

namespace tandem::trainer::internal {

class RunDir {
 public:
  // Creates `path` (and parents), writes config.toml and run.json (git commit, build flags,
  // device, command line, model size, start time).
  static StatusOr<RunDir> Create(const std::string& path, const TrainConfig& config, const std::string& command_line,
                                 Device device, const model::LlamaConfig& model_config);
  const std::string& path() const { return path_; }
  // Writes checkpoints/step-N/ (what `write` puts into the directory it is given: the model's
  // config.json + model.safetensors, or a PEFT adapter; plus the tokenizer files) into a
  // temporary directory, renames it into place, then points checkpoints/latest at it. Returns
  // the checkpoint's path.
  StatusOr<std::string> SaveCheckpoint(const std::function<Status(const std::string& dir)>& write, int64_t step,
                                       const model::Tokenizer& tokenizer, const std::string& tokenizer_path) const;

 private:
  explicit RunDir(std::string path) : path_(std::move(path)) {}
  std::string path_;
};

// Peak resident set size of this process (VmHWM), 0 when unknown.
int64_t PeakResidentBytes();

}  // namespace tandem::trainer::internal
