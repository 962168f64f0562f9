// Writing an adapter directory (a safetensors file of its tensors plus a JSON config), shared by
// the LoRA (PEFT) and S²FT formats. Private to peft.
#pragma once

#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/status.h"
#include "core/tensor.h"
#include "model/llama.h"

namespace tandem::peft::internal {

// Writes `path` through a temporary file and a rename, so a crash never leaves half a file.
Status WriteTextFileAtomic(const std::string& path, const std::string& text);

struct AdapterDirSpec {
  std::string who;            // the caller, for errors: "SaveLoraAdapter"
  std::string weights_file;   // e.g. "adapter_model.safetensors"
  std::string format;         // safetensors metadata "format"
  std::string config_file;    // e.g. "adapter_config.json"
  std::string config_json;    // its contents
};

// Creates `dir` and writes every parameter (named by Parameter::name; host f32 from `to_host(i)`,
// stored as `dtype`: f32, bf16 or f16) to spec.weights_file, then spec.config_file.
Status WriteAdapterDir(const AdapterDirSpec& spec, const std::string& dir, DType dtype,
                       const std::vector<model::Parameter>& params,
                       const std::function<StatusOr<Tensor>(size_t)>& to_host);

}  // namespace tandem::peft::internal
