// LoRA adapters in HF PEFT's on-disk format, which PEFT (PeftModel.from_pretrained) and vLLM load:
//
//   <dir>/adapter_config.json        peft_type "LORA", r, lora_alpha, lora_dropout,
//                                    target_modules, use_rslora, rank_pattern, alpha_pattern,
//                                    bias "none", base_model_name_or_path, task_type "CAUSAL_LM"
//   <dir>/adapter_model.safetensors  base_model.model.model.layers.L.{self_attn,mlp}.X_proj
//                                    .lora_{A,B}.weight: A [r, in], B [out, r]
//
// Reading is strict, so an adapter never loads into the wrong model or with silently different
// math. Errors name the file and the key or tensor:
//   - peft_type other than LORA; use_dora, bias other than "none", lora_bias, fan_in_fan_out,
//     modules_to_save, layers_to_transform, layer_replication, target_parameters, exclude_modules,
//     trainable_token_indices, use_qalora, alora_invocation_tokens, megatron_config, loftq_config,
//     arrow_config: Unimplemented when set to anything but their defaults (null, false, "none",
//     empty); init_lora_weights other than a boolean, "gaussian", "eva" or "orthogonal" (PiSSA,
//     OLoRA, CorDA and LoftQ rewrite the base weights): Unimplemented;
//   - keys tandem does not know: accepted when null, false or empty (newer PEFT versions add such
//     defaults), else InvalidArgument; known bookkeeping keys (init_lora_weights, inference_mode,
//     revision, peft_version, ...) are ignored;
//   - target_modules that select nothing in the base model (peft/lora.h's rules);
//   - a missing tensor, a tensor of the wrong shape (e.g. another base model's hidden size), or an
//     unexpected tensor (DoRA magnitudes, biases, layers or modules the config does not target).
// Tensors may be F32, BF16 or F16 and are converted to f32 masters.
//
// Writing: tensors from the f32 masters in `dtype` (f32, bf16 or f16), sorted, with metadata
// {"format": "pt"}; the config with PEFT's defaults for the keys tandem does not use, so that
// peft.LoraConfig.from_pretrained reads it. "all-linear" is written as the list of projection
// names, as PEFT does.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "model/config.h"
#include "ops/context.h"
#include "peft/lora.h"

namespace tandem::peft {

inline constexpr char kAdapterConfigFile[] = "adapter_config.json";
inline constexpr char kAdapterWeightsFile[] = "adapter_model.safetensors";

// adapter_config.json text for `config` (keys sorted, two-space indent).
std::string LoraConfigToJson(const LoraConfig& config);
// Parses adapter_config.json text; `source` (the path) is named in every error.
StatusOr<LoraConfig> ParseLoraConfigJson(const std::string& text, const std::string& source);
// Reads <dir>/adapter_config.json (or a .json path).
StatusOr<LoraConfig> LoadLoraConfig(const std::string& path);

// Writes <dir>/adapter_config.json and <dir>/adapter_model.safetensors; creates dir. Under tensor
// parallelism (adapter.parallel().tp_size > 1) a collective over the tp group: every tp rank
// calls it, the sliced tensors are gathered and tp rank 0 writes the whole adapter (`dir` is not
// touched on the other ranks).
Status SaveLoraAdapter(const LoraAdapter& adapter, const std::string& dir,
                       DType dtype = DType::kF32);

// Reads an adapter directory for a model of architecture `base` on ctx's device; under
// parallel.tp_size > 1 each rank keeps its slices (peft/lora.h).
StatusOr<std::unique_ptr<LoraAdapter>> LoadLoraAdapter(ops::Context& ctx,
                                                       const model::LlamaConfig& base,
                                                       const std::string& dir,
                                                       const LoraParallel& parallel = {});

// What CheckLoraAdapterDir found: the adapter's config and its targets in `base`.
struct LoraAdapterInfo {
  LoraConfig config;
  std::vector<LoraTarget> targets;
};

// Checks an adapter directory for a model of architecture `base` as LoadLoraAdapter does (the
// config, and every tensor's presence, name, shape and dtype from the safetensors header) without
// reading the weights or allocating the adapter. For registering many adapters whose weights are
// read later (tandem serve's disk tier).
StatusOr<LoraAdapterInfo> CheckLoraAdapterDir(const model::LlamaConfig& base,
                                              const std::string& dir);

}  // namespace tandem::peft
