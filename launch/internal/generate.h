// Text generation for `tandem generate`: one prompt, one sequence, for demos and quick checks of a
// checkpoint (runs/<name>/checkpoints/step-N/ or any HF config.json + safetensors directory),
// optionally with a PEFT LoRA adapter. Not the serving engine: there is no KV cache, every step
// recomputes the logits of the whole sequence (O(T^2) per token; fine for a few hundred tokens).
//
//   GenerateOptions o;
//   o.model_dir = "runs/tiny-cpu/checkpoints/step-150";
//   o.prompt = "The jury";
//   TANDEM_ASSIGN_OR_RETURN(std::string text, RunGenerate(o));
//
// The prompt is encoded with the tokenizer, after its BOS when it has one. Each step feeds the
// last max_position_embeddings ids (the context is cut from the left beyond that), samples the
// last row (serve/sampling.h, one Rng stream DeriveSeed(seed, 0, "sampling")), and stops
// at an EOS id (the tokenizer's or any of config.json's eos_token_ids, unless ignore_eos), when
// the decoded continuation contains `stop` (the text is cut before it), or after max_tokens.
// Tokens are drawn only from ids both the model and the tokenizer know (a model's vocabulary may
// be padded beyond the tokenizer's). The same options give the same output on the same device.
//
// Thread-safety: each call builds its own context and model.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"
#include "model/llama.h"
#include "model/tokenizer.h"
#include "serve/sampling.h"

namespace tandem::launch {

// The sampler lives in serve/ (the engine uses it too); generate keeps its historical names.
using SamplingParams = serve::SamplerParams;
using serve::Argmax;
using serve::FilteredProbabilities;
using serve::SampleToken;
using serve::ValidateSamplingParams;

struct GenerateOptions {
  std::string model_dir;    // config.json + model.safetensors (or a sharded index)
  std::string adapter_dir;  // PEFT LoRA adapter directory; "" for the base model alone
  // "byte", a tokenizer.json path (or a directory holding one), or "" for
  // model_dir/tokenizer.json when it exists, else "byte".
  std::string tokenizer;
  std::string prompt;
  int64_t max_tokens = 64;  // tokens to generate at most (>= 0)
  SamplingParams sampling;
  uint64_t seed = 0;
  std::string device = "cpu";  // "cpu" or "cuda:N"
  std::string stop;            // stop when the continuation contains this text ("" = none)
  bool ignore_eos = false;     // keep going past EOS (for benchmarks and tests)
};

enum class FinishReason { kLength, kEos, kStop };
const char* FinishReasonName(FinishReason reason);  // "length", "eos", "stop"

struct Generation {
  std::vector<int32_t> prompt_ids;  // as fed to the model: BOS (if any) + the encoded prompt
  std::vector<int32_t> ids;         // generated ids, without a final EOS
  std::string text;                 // decoded ids (special tokens skipped), cut before `stop`
  FinishReason finish = FinishReason::kLength;
};

// The tokenizer GenerateOptions::tokenizer names for a model in `model_dir`.
StatusOr<std::unique_ptr<model::Tokenizer>> ResolveTokenizer(const std::string& spec,
                                                             const std::string& model_dir);

// The generation loop over a loaded model (with its adapter attached, if any). Uses the options'
// prompt, max_tokens, sampling, seed, stop and ignore_eos; ignores the rest.
StatusOr<Generation> Generate(model::LlamaModel& model, const model::Tokenizer& tokenizer,
                              const GenerateOptions& options);

// Loads model, adapter and tokenizer as the options say, then Generate.
StatusOr<Generation> GenerateFromOptions(const GenerateOptions& options);

// GenerateFromOptions(options).text: what `tandem generate` prints.
StatusOr<std::string> RunGenerate(const GenerateOptions& options);

}  // namespace tandem::launch
