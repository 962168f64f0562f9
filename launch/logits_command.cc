#include <cstdio>
#include <sstream>
#include <string>

#include "launch/commands.h"
#include "model/llama.h"
#include "model/safetensors.h"
#include "ops/context.h"
#include "peft/adapter_io.h"
#include "peft/adapter_set.h"
#include "peft/s2ft.h"
#include "peft/s2ft_io.h"

namespace tandem::launch {
namespace {

// "1,2,3;4,5,6" -> i32 [B, T] (every row the same length).
StatusOr<Tensor> ParseTokens(const std::string& text) {
  std::vector<std::vector<int32_t>> rows;
  std::stringstream rs(text);
  std::string row;
  while (std::getline(rs, row, ';')) {
    std::vector<int32_t> ids;
    std::stringstream is(row);
    std::string id;
    while (std::getline(is, id, ',')) {
      try {
        ids.push_back(static_cast<int32_t>(std::stol(id)));
      } catch (const std::exception&) {
        return InvalidArgumentError(StrCat("--tokens: '", id, "' is not an integer"));
      }
    }
    rows.push_back(std::move(ids));
  }
  if (rows.empty() || rows[0].empty()) return InvalidArgumentError("--tokens is empty");
  Tensor t = Tensor::Cpu({static_cast<int64_t>(rows.size()), static_cast<int64_t>(rows[0].size())}, DType::kI32);
  for (size_t b = 0; b < rows.size(); ++b) {
    if (rows[b].size() != rows[0].size()) {
      return InvalidArgumentError(StrCat("--tokens: row ", b, " has ", rows[b].size(), " ids, row 0 has ", rows[0].size()));
    }
    std::copy(rows[b].begin(), rows[b].end(), t.data<int32_t>() + b * rows[0].size());
  }
  return t;
}

// What --adapter attached: a LoRA adapter set (hooks) or nothing (an S2FT adapter is merged).
struct AttachedAdapter {
  std::unique_ptr<peft::AdapterSet> lora;
};

// A PEFT LoRA directory runs through the adapter hooks; an S2FT directory is merged into the
// weights (W[:, idx] += block).
StatusOr<AttachedAdapter> AttachAdapter(ops::Context& ctx, model::LlamaModel& llama,
                                        const std::string& dir) {
  AttachedAdapter a;
  if (peft::IsS2ftAdapterDir(dir)) {
    TANDEM_ASSIGN_OR_RETURN(auto s2ft, peft::LoadS2ftAdapter(ctx, llama.config(), dir));
    TANDEM_RETURN_IF_ERROR(s2ft->Merge(llama));
    return a;
  }
  TANDEM_ASSIGN_OR_RETURN(auto lora, peft::LoadLoraAdapter(ctx, llama.config(), dir));
  a.lora = std::make_unique<peft::AdapterSet>(ctx, llama.config());
  TANDEM_ASSIGN_OR_RETURN(int index, a.lora->Add(std::move(lora)));
  a.lora->set_default_adapter(index);
  llama.SetAdapter(a.lora.get());
  return a;
}

Status Run(const std::string& model_dir, const std::string& tokens_text, const std::string& out,
           const std::string& device_text, const std::string& adapter_dir) {
  TANDEM_ASSIGN_OR_RETURN(Device device, ParseDevice(device_text));
  TANDEM_ASSIGN_OR_RETURN(std::unique_ptr<ops::Context> ctx, ops::Context::ForDevice(device));
  TANDEM_ASSIGN_OR_RETURN(model::LlamaConfig config, model::LoadLlamaConfig(model_dir + "/config.json"));
  model::ModelOptions options;
  options.trainable = false;
  TANDEM_ASSIGN_OR_RETURN(auto llama, model::LlamaModel::Create(*ctx, config, options));
  TANDEM_RETURN_IF_ERROR(llama->LoadSafetensors(model_dir));
  AttachedAdapter attached;
  if (!adapter_dir.empty()) {
    TANDEM_ASSIGN_OR_RETURN(attached, AttachAdapter(*ctx, *llama, adapter_dir));
  }
  model::Batch batch;
  TANDEM_ASSIGN_OR_RETURN(batch.tokens, ParseTokens(tokens_text));
  batch.targets = Tensor::Cpu(batch.tokens.shape(), DType::kI32);
  std::fill_n(batch.targets.data<int32_t>(), batch.targets.numel(), -100);
  TANDEM_ASSIGN_OR_RETURN(Tensor logits, llama->Logits(batch));
  llama->SetAdapter(nullptr);
  return model::WriteSafetensors(out, {{"input_ids", batch.tokens}, {"logits", logits}});
}

}  // namespace

int LogitsCommand(const Args& args) {
  std::string model_dir, tokens, out, device = "cpu", adapter;
  for (size_t i = 0; i + 1 < args.size(); i += 2) {
    if (args[i] == "--model") model_dir = args[i + 1];
    else if (args[i] == "--tokens") tokens = args[i + 1];
    else if (args[i] == "--out") out = args[i + 1];
    else if (args[i] == "--device") device = args[i + 1];
    else if (args[i] == "--adapter") adapter = args[i + 1];
    else {
      std::fprintf(stderr, "tandem logits: unexpected argument '%s'\n", args[i].c_str());
      return 2;
    }
  }
  if (model_dir.empty() || tokens.empty() || out.empty() || args.size() % 2 != 0) {
    std::printf("usage: tandem logits --model DIR --tokens \"1,2,3;4,5,6\" --out FILE.safetensors [--device cpu|cuda:N]\n"
                "                     [--adapter DIR]\n"
                "Writes the model's logits (f32 [B, T, V]) for the token rows, to compare with other frameworks.\n"
                "--adapter: a PEFT LoRA adapter directory (adapter_config.json) or a tandem S2FT adapter\n"
                "directory (s2ft_config.json, merged into the weights).\n");
    return 2;
  }
  Status s = Run(model_dir, tokens, out, device, adapter);
  if (!s.ok()) {
    std::fprintf(stderr, "tandem logits: %s\n", s.message().c_str());
    return 1;
  }
  std::printf("wrote %s\n", out.c_str());
  return 0;
}

}  // namespace tandem::launch
