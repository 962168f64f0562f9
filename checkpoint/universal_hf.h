// Conversions between universal checkpoints and Hugging Face formats: a base model (config.json +
// model.safetensors that transformers loads), a fresh checkpoint from a HF model, and an adapter
// in PEFT format. These back `tandem ckpt export-hf | import-hf | export-adapter`.
//
// Naming: base parameters are stored under their HF names (model.layers.L.self_attn.q_proj.weight,
// ...); adapter tensors under PEFT's file names (base_model.model.<module>.lora_A.weight) in
// /adapters/<adapter>/, with the adapter's adapter_config.json text as its config. Export writes
// tensors as stored (from the f32 masters).
// Thread-safety: free functions, no shared state.
#pragma once

#include <string>

#include "checkpoint/universal.h"
#include "core/dtype.h"

namespace tandem::checkpoint {

// Megatron-style tensor-parallel split of a Llama parameter by HF name: q/k/v/gate/up by rows
// (column-parallel), o/down by columns (row-parallel), embed_tokens and lm_head by vocabulary rows
// (padded), norms replicated. (LoRA tensors: the caller's choice.)
SplitSpec LlamaSplitSpec(const std::string& hf_name);

// Writes `dir`/config.json and `dir`/model.safetensors (dtype f32, bf16 or f16) from the base
// parameters of checkpoint `path` (a file or a checkpoint directory). One tensor in memory at a
// time. InvalidArgument when the checkpoint has no model config.
Status ExportHf(const std::string& path, const std::string& dir, DType dtype);

// Makes checkpoint file `out_path` from a HF model directory: masters from the weights (any
// float dtype), zero Adam moments, step 0, every parameter trainable, mesh 1 x 1 x 1.
Status ImportHf(const std::string& model_dir, const std::string& out_path);

// Writes adapter `adapter` (may be "" when the checkpoint holds exactly one) of checkpoint `path`
// to `dir` in PEFT format (adapter_config.json + adapter_model.safetensors in dtype).
Status ExportAdapter(const std::string& path, const std::string& adapter, const std::string& dir,
                     DType dtype);

}  // namespace tandem::checkpoint
