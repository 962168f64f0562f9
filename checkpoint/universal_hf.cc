#include "checkpoint/universal_hf.h"

#include <filesystem>

#include "model/config.h"
#include "model/safetensors.h"
#include "ops/context.h"
#include "peft/adapter_io.h"
#include "peft/lora.h"

namespace tandem::checkpoint {
namespace {

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

const char* TorchDType(DType dtype) {
  return dtype == DType::kBF16 ? "bfloat16" : dtype == DType::kF16 ? "float16" : "float32";
}

StatusOr<model::LlamaConfig> ModelConfig(const UniversalReader& reader) {
  if (reader.meta().model_config_json.empty() || reader.meta().model_config_json == "{}") {
    return InvalidArgumentError(StrCat(reader.path(),
                                       ": the checkpoint records no model config "
                                       "(attribute 'model_config'), so it cannot be exported"));
  }
  return model::ParseLlamaConfigJson(reader.meta().model_config_json,
                                     reader.path() + " (attribute 'model_config')");
}

}  // namespace

SplitSpec LlamaSplitSpec(const std::string& name) {
  SplitSpec s;
  if (name == "model.embed_tokens.weight" || name == "lm_head.weight") {
    s.tp_dim = 0;
    s.vocab_parallel = true;
  } else if (EndsWith(name, "q_proj.weight") || EndsWith(name, "k_proj.weight") ||
             EndsWith(name, "v_proj.weight") || EndsWith(name, "gate_proj.weight") ||
             EndsWith(name, "up_proj.weight")) {
    s.tp_dim = 0;
  } else if (EndsWith(name, "o_proj.weight") || EndsWith(name, "down_proj.weight")) {
    s.tp_dim = 1;
  }
  return s;
}

Status ExportHf(const std::string& path, const std::string& dir, DType dtype) {
  if (dtype != DType::kF32 && dtype != DType::kBF16 && dtype != DType::kF16) {
    return InvalidArgumentError(
        StrCat("export dtype must be f32, bf16 or f16, found ", DTypeName(dtype)));
  }
  TANDEM_ASSIGN_OR_RETURN(UniversalReader reader, UniversalReader::Open(path));
  TANDEM_ASSIGN_OR_RETURN(model::LlamaConfig config, ModelConfig(reader));
  config.torch_dtype = TorchDType(dtype);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return InternalError(StrCat("creating ", dir, ": ", ec.message()));
  TANDEM_RETURN_IF_ERROR(model::SaveLlamaConfig(config, dir + "/config.json"));
  std::vector<model::SafetensorsTensorSpec> specs;
  for (const TensorInfo& t : reader.tensors()) {
    if (t.adapter.empty()) specs.push_back({t.name, dtype, t.shape});
  }
  std::sort(specs.begin(), specs.end(),
            [](const auto& a, const auto& b) { return a.name < b.name; });
  return model::WriteSafetensorsStreaming(
      dir + "/model.safetensors", specs,
      [&](size_t i) -> StatusOr<Tensor> {
        TANDEM_ASSIGN_OR_RETURN(TensorShard s, reader.ReadAll(specs[i].name, "", false));
        if (dtype == DType::kF32) return s.master;
        return CastCpu(s.master, dtype);
      },
      {{"format", "pt"}});
}

Status ImportHf(const std::string& model_dir, const std::string& out_path) {
  TANDEM_ASSIGN_OR_RETURN(model::LlamaConfig config,
                          model::LoadLlamaConfig(model_dir + "/config.json"));
  TANDEM_ASSIGN_OR_RETURN(model::SafetensorsCheckpoint ckpt,
                          model::SafetensorsCheckpoint::Open(model_dir));
  std::vector<TensorShard> shards;
  int64_t largest = 0;
  for (const std::string& name : ckpt.names()) {
    if (EndsWith(name, "rotary_emb.inv_freq")) continue;
    if (config.tie_word_embeddings && name == "lm_head.weight") continue;
    const model::SafetensorsTensorInfo* info = ckpt.Find(name);
    TensorShard s;
    s.name = name;
    s.logical_shape = info->shape;
    s.split = LlamaSplitSpec(name);
    s.slab = Hyperslab{Shape(info->shape.size(), 0), info->shape};
    TANDEM_ASSIGN_OR_RETURN(s.master, ckpt.GetFloat(name, info->shape));
    if (!s.master.is_contiguous()) return InternalError(StrCat(name, ": non-contiguous tensor"));
    largest = std::max(largest, s.master.numel());
    shards.push_back(std::move(s));
  }
  if (shards.empty()) return InvalidArgumentError(StrCat(model_dir, ": no tensors to import"));
  // Fresh Adam state: every moment views one shared zero buffer.
  Tensor zeros = Tensor::CpuZeros({largest}, DType::kF32);
  for (TensorShard& s : shards) {
    s.exp_avg = Tensor::Wrap(zeros.raw_data(), s.logical_shape, DType::kF32, Device::Cpu());
    s.exp_avg_sq = s.exp_avg;
  }
  UniversalMeta meta;
  meta.model_config_json = model::LlamaConfigToJson(config);
  meta.config_toml = StrCat("# imported from ", model_dir, "\n");
  meta.data_position_json = "{}";
  meta.rng_state_json = "{}";
  return SaveUniversalFile(out_path, meta, shards, nullptr, {});
}

Status ExportAdapter(const std::string& path, const std::string& adapter_name,
                     const std::string& dir, DType dtype) {
  TANDEM_ASSIGN_OR_RETURN(UniversalReader reader, UniversalReader::Open(path));
  const auto& configs = reader.meta().adapter_configs;
  std::string name = adapter_name;
  if (name.empty()) {
    if (configs.empty()) return NotFoundError(StrCat(reader.path(), ": holds no adapters"));
    if (configs.size() != 1) {
      return InvalidArgumentError(StrCat(reader.path(), ": holds ", configs.size(),
                                         " adapters; name the one to export with --adapter"));
    }
    name = configs.begin()->first;
  }
  auto it = configs.find(name);
  if (it == configs.end()) return NotFoundError(StrCat(reader.path(), ": no adapter '", name, "'"));
  TANDEM_ASSIGN_OR_RETURN(model::LlamaConfig base, ModelConfig(reader));
  TANDEM_ASSIGN_OR_RETURN(
      peft::LoraConfig lora,
      peft::ParseLoraConfigJson(it->second, StrCat(reader.path(), " adapter '", name, "' config")));
  std::unique_ptr<ops::Context> ctx = ops::Context::Cpu();
  TANDEM_ASSIGN_OR_RETURN(auto adapter, peft::LoraAdapter::Create(*ctx, base, lora));
  for (size_t i = 0; i < adapter->parameters().size(); ++i) {
    TANDEM_ASSIGN_OR_RETURN(TensorShard s,
                            reader.ReadAll(adapter->parameters()[i].name, name, false));
    TANDEM_RETURN_IF_ERROR(adapter->SetFromHost(i, s.master));
  }
  return peft::SaveLoraAdapter(*adapter, dir, dtype);
}

}  // namespace tandem::checkpoint
