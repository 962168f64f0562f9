#include "launch/internal/generate.h"

#include <algorithm>
#include <filesystem>
#include <memory>
#include <set>
#include <span>

#include "core/device.h"
#include "core/rng.h"
#include "core/tensor.h"
#include "ops/context.h"
#include "peft/adapter_io.h"
#include "peft/adapter_set.h"

namespace tandem::launch {
namespace {

namespace fs = std::filesystem;

// BOS (when the tokenizer has one) + the encoded prompt, every id checked against the model.
StatusOr<std::vector<int32_t>> EncodePrompt(const model::Tokenizer& tokenizer,
                                            const std::string& prompt, int64_t vocab_size) {
  std::vector<int32_t> ids;
  if (tokenizer.bos_id()) ids.push_back(*tokenizer.bos_id());
  const std::vector<int32_t> text_ids = tokenizer.Encode(prompt);
  ids.insert(ids.end(), text_ids.begin(), text_ids.end());
  if (ids.empty()) {
    return InvalidArgumentError(
        "the prompt is empty and the tokenizer has no BOS token: nothing to continue from");
  }
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size) {
      return InvalidArgumentError(StrCat("the ", tokenizer.kind(), " tokenizer gave token id ", id,
                                         " for the prompt, outside the ", "model's vocabulary [0, ",
                                         vocab_size,
                                         ") (config.json vocab_size): wrong tokenizer?"));
    }
  }
  return ids;
}

// Ids that end generation: the tokenizer's EOS and every eos_token_id of the model's config.
std::set<int32_t> EosIds(const model::Tokenizer& tokenizer, const model::LlamaConfig& config) {
  std::set<int32_t> eos(config.eos_token_ids.begin(), config.eos_token_ids.end());
  if (config.eos_token_id) eos.insert(*config.eos_token_id);
  if (tokenizer.eos_id()) eos.insert(*tokenizer.eos_id());
  return eos;
}

// Logits of the position after the last id of `context` (at most `max_len` ids, taken from the
// right): f32 host [V].
StatusOr<Tensor> NextLogits(model::LlamaModel& model, const std::vector<int32_t>& context,
                            int64_t max_len) {
  const int64_t T = std::min<int64_t>(static_cast<int64_t>(context.size()), max_len);
  model::Batch batch;
  batch.tokens = Tensor::Cpu({1, T}, DType::kI32);  // [1, T]
  std::copy(context.end() - T, context.end(), batch.tokens.data<int32_t>());
  TANDEM_ASSIGN_OR_RETURN(Tensor logits, model.Logits(batch));  // [1, T, V]
  const int64_t V = logits.dim(2);
  return logits.View({T, V}).Slice(0, T - 1, T).View({V});  // [V]
}

}  // namespace

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength:
      return "length";
    case FinishReason::kEos:
      return "eos";
    case FinishReason::kStop:
      return "stop";
  }
  return "unknown";
}

StatusOr<std::unique_ptr<model::Tokenizer>> ResolveTokenizer(const std::string& spec,
                                                             const std::string& model_dir) {
  if (spec == "byte") return model::MakeByteTokenizer();
  std::string path = spec;
  if (spec.empty()) {
    path = model_dir + "/tokenizer.json";
    if (!fs::exists(path)) return model::MakeByteTokenizer();
  } else if (fs::is_directory(path)) {
    path += "/tokenizer.json";
  }
  if (!fs::exists(path)) {
    return NotFoundError(StrCat("tokenizer: no file ", path,
                                " (expected \"byte\", a tokenizer.json or a directory with one)"));
  }
  return model::LoadTokenizer(path);
}

StatusOr<Generation> Generate(model::LlamaModel& model, const model::Tokenizer& tokenizer,
                              const GenerateOptions& options) {
  TANDEM_RETURN_IF_ERROR(ValidateSamplingParams(options.sampling));
  if (options.max_tokens < 0) {
    return InvalidArgumentError(
        StrCat("max_tokens: expected a value >= 0, found ", options.max_tokens));
  }
  const model::LlamaConfig& config = model.config();
  // A padded model vocabulary may exceed the tokenizer's: never sample ids it cannot decode.
  const int64_t candidates = std::min(config.vocab_size, tokenizer.vocab_size());
  Generation gen;
  TANDEM_ASSIGN_OR_RETURN(gen.prompt_ids,
                          EncodePrompt(tokenizer, options.prompt, config.vocab_size));
  const std::set<int32_t> eos = EosIds(tokenizer, config);
  std::vector<int32_t> context = gen.prompt_ids;
  Rng rng(DeriveSeed(options.seed, 0, "sampling"));
  while (static_cast<int64_t>(gen.ids.size()) < options.max_tokens) {
    TANDEM_ASSIGN_OR_RETURN(Tensor logits,
                            NextLogits(model, context, config.max_position_embeddings));
    const std::span<const float> row(logits.data<float>(), static_cast<size_t>(candidates));
    TANDEM_ASSIGN_OR_RETURN(int32_t id, SampleToken(row, options.sampling, rng));
    if (!options.ignore_eos && eos.count(id)) {
      gen.finish = FinishReason::kEos;
      break;
    }
    gen.ids.push_back(id);
    context.push_back(id);
    if (!options.stop.empty()) {
      const std::string text = tokenizer.Decode(gen.ids, /*skip_special=*/true);
      const size_t at = text.find(options.stop);
      if (at != std::string::npos) {
        gen.text = text.substr(0, at);
        gen.finish = FinishReason::kStop;
        return gen;
      }
    }
  }
  gen.text = tokenizer.Decode(gen.ids, /*skip_special=*/true);
  return gen;
}

StatusOr<Generation> GenerateFromOptions(const GenerateOptions& options) {
  if (options.model_dir.empty()) return InvalidArgumentError("no model directory given");
  TANDEM_ASSIGN_OR_RETURN(Device device, ParseDevice(options.device));
  TANDEM_ASSIGN_OR_RETURN(std::unique_ptr<ops::Context> ctx, ops::Context::ForDevice(device));
  TANDEM_ASSIGN_OR_RETURN(model::LlamaConfig config,
                          model::LoadLlamaConfig(options.model_dir + "/config.json"));
  TANDEM_ASSIGN_OR_RETURN(std::unique_ptr<model::Tokenizer> tokenizer,
                          ResolveTokenizer(options.tokenizer, options.model_dir));
  // Declared before the model so that it outlives the model's pointer to it.
  std::unique_ptr<peft::AdapterSet> adapters;
  if (!options.adapter_dir.empty()) {
    adapters = std::make_unique<peft::AdapterSet>(*ctx, config);
    TANDEM_ASSIGN_OR_RETURN(std::unique_ptr<peft::LoraAdapter> adapter,
                            peft::LoadLoraAdapter(*ctx, config, options.adapter_dir));
    TANDEM_ASSIGN_OR_RETURN(int index, adapters->Add(std::move(adapter)));
    adapters->set_default_adapter(index);
  }
  model::ModelOptions model_options;
  model_options.trainable = false;
  TANDEM_ASSIGN_OR_RETURN(std::unique_ptr<model::LlamaModel> model,
                          model::LlamaModel::Create(*ctx, config, model_options));
  TANDEM_RETURN_IF_ERROR(model->LoadSafetensors(options.model_dir));
  model->SetAdapter(adapters.get());
  StatusOr<Generation> gen = Generate(*model, *tokenizer, options);
  model->SetAdapter(nullptr);
  return gen;
}

StatusOr<std::string> RunGenerate(const GenerateOptions& options) {
  TANDEM_ASSIGN_OR_RETURN(Generation gen, GenerateFromOptions(options));
  return gen.text;
}

}  // namespace tandem::launch
