// S²FT adapters on disk: a directory with
//
//   s2ft_config.json        {"format": "tandem-s2ft", "format_version": 1, "peft_type": "S2FT",
//                            "base_model_name_or_path": ..., "base_model": {hidden_size,
//                            intermediate_size, num_hidden_layers, num_attention_heads,
//                            num_key_value_heads, head_dim}, "selection": "random"|"weight",
//                            "seed", "heads_fraction", "ffn_fraction", "budget", "coupled",
//                            "layers": [{"layer": l, "heads": [...], "channels": [...]}],
//                            "blocks": [{"name", "layer", "projection": "o_proj", "axis":
//                            "columns"|"rows", "indices": [...], "shape": [r, c]}]}
//   s2ft_model.safetensors  one dense tensor per block, named as the block
//                            ("model.layers.L.self_attn.o_proj.s2ft_delta"), F32/BF16/F16
//
// Indices are ORIGINAL row/column numbers of the HF weight W [out, in], ascending; applying the
// adapter is W[:, indices] += block (axis "columns", block [out, |indices|]) or W[indices, :] +=
// block (axis "rows", block [|indices|, in]); removing it subtracts. The permutation used while
// training never reaches the file.
//
// Loading is strict; errors name the file and the key or tensor: another format or version; a
// base_model that differs from the model's architecture; heads or channels out of range,
// duplicated, or not whole kv groups; blocks whose projection, axis, indices (out of range,
// duplicated, not the selection's) or shape do not match; missing, mis-shaped or unexpected
// tensors.
#pragma once

#include <memory>
#include <string>

#include "core/status.h"
#include "model/config.h"
#include "ops/context.h"
#include "peft/s2ft.h"

namespace tandem::peft {

inline constexpr char kS2ftConfigFile[] = "s2ft_config.json";
inline constexpr char kS2ftWeightsFile[] = "s2ft_model.safetensors";

// s2ft_config.json text of an adapter.
std::string S2ftConfigToJson(const S2ftAdapter& adapter);

// Writes <dir>/s2ft_config.json and <dir>/s2ft_model.safetensors (f32 masters in `dtype`: f32,
// bf16 or f16); creates dir.
Status SaveS2ftAdapter(const S2ftAdapter& adapter, const std::string& dir,
                       DType dtype = DType::kF32);

// Reads an adapter directory for a model of architecture `base` on ctx's device. The adapter's
// hooks need a base permuted for its selection (PermuteS2ftBase); Merge works on the original.
StatusOr<std::unique_ptr<S2ftAdapter>> LoadS2ftAdapter(ops::Context& ctx,
                                                       const model::LlamaConfig& base,
                                                       const std::string& dir);

// True when `dir` holds an s2ft_config.json.
bool IsS2ftAdapterDir(const std::string& dir);

}  // namespace tandem::peft
