// LlamaConfig: the architecture of a Llama-family model, read from and written to a Hugging Face
// `config.json` (model_type "llama", LlamaForCausalLM).
//
//   TANDEM_ASSIGN_OR_RETURN(LlamaConfig config, LoadLlamaConfig(dir + "/config.json"));
//   int64_t n = config.NumParameters();
//
// Parsing validates what tandem can run: SiLU MLP without biases, no attention bias, rope types
// "default" (or absent) and "llama3", consistent head counts. Every error names the file and key.
// Keys tandem does not use (e.g. "pretraining_tp", "use_cache") are ignored.
//
// Thread-safety: plain values.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/status.h"

namespace tandem::model {

// rope_scaling of a Llama-3.x config. rope_type "" means none (plain RoPE, also "default").
struct RopeScaling {
  std::string rope_type;                            // "" or "llama3"
  double factor = 8.0;                              // low-frequency wavelengths are divided by this
  double low_freq_factor = 1.0;                     // wavelengths above orig_max / this: scaled
  double high_freq_factor = 4.0;                    // wavelengths below orig_max / this: kept
  int64_t original_max_position_embeddings = 8192;  // context length before scaling
};

struct LlamaConfig {
  int64_t vocab_size = 0;           // V
  int64_t hidden_size = 0;          // C
  int64_t intermediate_size = 0;    // F
  int64_t num_hidden_layers = 0;    // L
  int64_t num_attention_heads = 0;  // Hq
  int64_t num_key_value_heads = 0;  // Hkv (HF default: Hq)
  int64_t head_dim = 0;             // D (HF default: C / Hq)
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;  // lm_head shares embed_tokens' weight
  int64_t max_position_embeddings = 2048;
  std::optional<int32_t> bos_token_id;
  std::optional<int32_t> eos_token_id;  // the first of eos_token_ids
  std::vector<int32_t> eos_token_ids;   // all of them (a config may list several)
  std::string torch_dtype = "float32";  // dtype of the saved weights: float32, bfloat16, float16

  // Number of scalar parameters (embeddings, all layers, final norm, lm_head unless tied).
  int64_t NumParameters() const;
};

// Checks a config built in code the same way parsing does (positive sizes, head counts that
// divide, even head_dim, known rope type). `source_name` prefixes errors.
Status ValidateLlamaConfig(const LlamaConfig& config, const std::string& source_name = "config");

// Parses config.json text. `source_name` (usually the path) is named in every error.
StatusOr<LlamaConfig> ParseLlamaConfigJson(const std::string& text, const std::string& source_name);
// Reads and parses a config.json file (NotFound when it does not exist).
StatusOr<LlamaConfig> LoadLlamaConfig(const std::string& path);
// Writes a config.json that transformers' AutoConfig / LlamaForCausalLM load (architectures,
// model_type "llama", hidden_act "silu", no biases). Validates first.
Status SaveLlamaConfig(const LlamaConfig& config, const std::string& path);
// The JSON text SaveLlamaConfig writes.
std::string LlamaConfigToJson(const LlamaConfig& config);

}  // namespace tandem::model
