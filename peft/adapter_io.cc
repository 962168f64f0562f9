// PEFT-format adapter files (peft/adapter_io.h).
#include "peft/adapter_io.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "model/safetensors.h"
#include "peft/internal/adapter_files.h"

namespace tandem::peft {
namespace {

using Json = nlohmann::ordered_json;  // keeps rank_pattern / alpha_pattern in file order

// Keys whose value changes the math or the module set; tandem supports only their defaults.
constexpr const char* kMustBeDefault[] = {"use_dora",
                                          "lora_bias",
                                          "fan_in_fan_out",
                                          "modules_to_save",
                                          "layers_to_transform",
                                          "layer_replication",
                                          "target_parameters",
                                          "exclude_modules",
                                          "trainable_token_indices",
                                          "use_qalora",
                                          "alora_invocation_tokens",
                                          "megatron_config",
                                          "loftq_config",
                                          "arrow_config"};
// Bookkeeping and initialization-only keys, ignored whatever their value.
constexpr const char* kIgnored[] = {"inference_mode", "revision",           "peft_version",
                                    "auto_mapping",   "megatron_core",      "layers_pattern",
                                    "eva_config",     "corda_config",       "qalora_group_size",
                                    "runtime_config", "ensure_weight_tying"};
constexpr const char* kUsed[] = {"peft_type",      "r",
                                 "lora_alpha",     "lora_dropout",
                                 "target_modules", "use_rslora",
                                 "rank_pattern",   "alpha_pattern",
                                 "bias",           "base_model_name_or_path",
                                 "task_type"};

// init_lora_weights: initializations that leave the base untouched are fine (the file holds the
// trained weights); PiSSA, OLoRA, CorDA and LoftQ rewrite the base, which tandem does not have.
Status CheckInit(const Json& j, const std::string& source) {
  if (!j.contains("init_lora_weights") || j["init_lora_weights"].is_boolean()) return Status::Ok();
  const Json& v = j["init_lora_weights"];
  const std::string s = v.is_string() ? v.get<std::string>() : "";
  if (s == "gaussian" || s == "eva" || s == "orthogonal") return Status::Ok();
  return UnimplementedError(StrCat(source, ": init_lora_weights = ", v.dump(),
                                   " modifies the base model; convert the adapter to plain LoRA "
                                   "(PEFT's path_initial_model_for_weight_conversion) first"));
}

bool IsDefaultLike(const Json& v) {
  return v.is_null() || (v.is_boolean() && !v.get<bool>()) ||
         ((v.is_array() || v.is_object() || v.is_string()) && v.empty());
}

template <size_t N>
bool In(const char* const (&list)[N], const std::string& key) {
  for (const char* k : list) {
    if (key == k) return true;
  }
  return false;
}

Status CheckKeys(const Json& j, const std::string& source) {
  for (const auto& [key, value] : j.items()) {
    if (In(kUsed, key) || In(kIgnored, key) || key == "init_lora_weights") continue;
    if (In(kMustBeDefault, key)) {
      if (IsDefaultLike(value)) continue;
      return UnimplementedError(StrCat(source, ": \"", key, "\" = ", value.dump(),
                                       " is not supported by tandem (only plain LoRA: null, false "
                                       "or empty)"));
    }
    if (!IsDefaultLike(value)) {
      return InvalidArgumentError(StrCat(source, ": unknown key \"", key, "\" = ", value.dump(),
                                         " (tandem accepts unknown keys only when null, false or "
                                         "empty)"));
    }
  }
  return Status::Ok();
}

StatusOr<double> GetNumber(const Json& j, const char* key, const std::string& source) {
  if (!j.contains(key)) return InvalidArgumentError(StrCat(source, ": missing key \"", key, "\""));
  if (!j[key].is_number()) {
    return InvalidArgumentError(
        StrCat(source, ": \"", key, "\" must be a number, found ", j[key].dump()));
  }
  return j[key].get<double>();
}

Status ParsePatterns(const Json& j, const std::string& source, LoraConfig& c) {
  for (const char* key : {"rank_pattern", "alpha_pattern"}) {
    if (!j.contains(key) || j[key].is_null()) continue;
    if (!j[key].is_object()) {
      return InvalidArgumentError(
          StrCat(source, ": \"", key, "\" must be an object, found ", j[key].dump()));
    }
    for (const auto& [k, v] : j[key].items()) {
      const bool rank = std::string(key) == "rank_pattern";
      if (rank ? !v.is_number_integer() : !v.is_number()) {
        return InvalidArgumentError(StrCat(source, ": ", key, "[\"", k, "\"] must be ",
                                           rank ? "an integer" : "a number", ", found ", v.dump()));
      }
      if (rank) {
        c.rank_pattern.emplace_back(k, v.get<int64_t>());
      } else {
        c.alpha_pattern.emplace_back(k, v.get<double>());
      }
    }
  }
  return Status::Ok();
}

Status ParseTargets(const Json& j, const std::string& source, LoraConfig& c) {
  if (!j.contains("target_modules")) {
    return InvalidArgumentError(StrCat(source, ": missing key \"target_modules\""));
  }
  const Json& t = j["target_modules"];
  c.target_modules.clear();
  if (t.is_string()) {
    if (t.get<std::string>() != "all-linear") {
      return UnimplementedError(StrCat(source, ": target_modules = ", t.dump(),
                                       " is a regex (PEFT matches a string with re.fullmatch); "
                                       "tandem reads a list of module names or \"all-linear\""));
    }
    c.target_modules.push_back("all-linear");
    return Status::Ok();
  }
  if (!t.is_array() || t.empty()) {
    return InvalidArgumentError(StrCat(source,
                                       ": target_modules must be a non-empty list of "
                                       "module names or \"all-linear\", found ",
                                       t.dump()));
  }
  for (const Json& e : t) {
    if (!e.is_string()) {
      return InvalidArgumentError(
          StrCat(source, ": target_modules entries must be strings, found ", e.dump()));
    }
    c.target_modules.push_back(e.get<std::string>());
  }
  return Status::Ok();
}

// Why a tensor of the file is not one tandem expects.
std::string UnexpectedTensorHint(const std::string& name, int64_t num_layers) {
  if (name.find("lora_magnitude_vector") != std::string::npos) {
    return "a DoRA magnitude vector: DoRA adapters are not supported";
  }
  if (name.size() >= 5 && name.compare(name.size() - 5, 5, ".bias") == 0) {
    return "a bias: only bias \"none\" is supported";
  }
  if (name.find("lora_embedding_") != std::string::npos) return "embedding LoRA is not supported";
  const std::string prefix = "base_model.model.model.layers.";
  if (name.rfind(prefix, 0) == 0) {
    const int64_t layer = std::atoll(name.c_str() + prefix.size());
    if (layer >= num_layers) {
      return StrCat("layer ", layer, " does not exist in the base model (", num_layers,
                    " layers): the adapter was made for a different model");
    }
  }
  return "not a LoRA tensor of a module that adapter_config.json's target_modules selects";
}

}  // namespace

std::string LoraConfigToJson(const LoraConfig& c) {
  static const char* kAll[] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                               "gate_proj", "up_proj", "down_proj"};
  std::vector<std::string> targets;
  for (const std::string& raw : c.target_modules) {
    if (raw == "all-linear") {
      targets.insert(targets.end(), std::begin(kAll), std::end(kAll));
      continue;
    }
    // Short names become PEFT's module names.
    std::string e = raw;
    for (const char* full : kAll) {
      if (e + "_proj" == full) e = full;
    }
    if (std::find(targets.begin(), targets.end(), e) == targets.end()) targets.push_back(e);
  }
  Json rank = Json::object(), alpha = Json::object();
  for (const auto& [k, v] : c.rank_pattern) rank[k] = v;
  for (const auto& [k, v] : c.alpha_pattern) alpha[k] = v;
  const bool int_alpha = std::nearbyint(c.alpha) == c.alpha && std::abs(c.alpha) < 1e15;
  Json j = Json::object();  // keys in sorted order, as PEFT writes them
  j["alpha_pattern"] = alpha;
  j["auto_mapping"] = nullptr;
  j["base_model_name_or_path"] =
      c.base_model_name_or_path.empty() ? Json(nullptr) : Json(c.base_model_name_or_path);
  j["bias"] = "none";
  j["fan_in_fan_out"] = false;
  j["inference_mode"] = true;
  j["init_lora_weights"] = true;
  j["layers_pattern"] = nullptr;
  j["layers_to_transform"] = nullptr;
  j["loftq_config"] = Json::object();
  j["lora_alpha"] = int_alpha ? Json(static_cast<int64_t>(c.alpha)) : Json(c.alpha);
  j["lora_dropout"] = c.dropout;
  j["megatron_config"] = nullptr;
  j["megatron_core"] = "megatron.core";
  j["modules_to_save"] = nullptr;
  j["peft_type"] = "LORA";
  j["r"] = c.r;
  j["rank_pattern"] = rank;
  j["revision"] = nullptr;
  j["target_modules"] = targets;
  j["task_type"] = "CAUSAL_LM";
  j["use_dora"] = false;
  j["use_rslora"] = c.use_rslora;
  return j.dump(2) + "\n";
}

StatusOr<LoraConfig> ParseLoraConfigJson(const std::string& text, const std::string& source) {
  const Json j = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return InvalidArgumentError(StrCat(source, ": not a JSON object"));
  }
  if (!j.contains("peft_type") || !j["peft_type"].is_string() ||
      j["peft_type"].get<std::string>() != "LORA") {
    return UnimplementedError(StrCat(source, ": peft_type ",
                                     j.contains("peft_type") ? j["peft_type"].dump() : "(missing)",
                                     " is not supported; tandem reads \"LORA\" adapters"));
  }
  TANDEM_RETURN_IF_ERROR(CheckKeys(j, source));
  TANDEM_RETURN_IF_ERROR(CheckInit(j, source));
  if (j.contains("bias") && !(j["bias"].is_string() && j["bias"].get<std::string>() == "none")) {
    return UnimplementedError(
        StrCat(source, ": bias = ", j["bias"].dump(), " is not supported (only \"none\")"));
  }
  if (j.contains("task_type") && !j["task_type"].is_null() &&
      !(j["task_type"].is_string() && j["task_type"].get<std::string>() == "CAUSAL_LM")) {
    return UnimplementedError(StrCat(source, ": task_type = ", j["task_type"].dump(),
                                     " is not supported (tandem adapts causal LMs: CAUSAL_LM)"));
  }
  LoraConfig c;
  if (!j.contains("r") || !j["r"].is_number_integer()) {
    return InvalidArgumentError(StrCat(source, ": \"r\" must be an integer, found ",
                                       j.contains("r") ? j["r"].dump() : "(missing)"));
  }
  c.r = j["r"].get<int64_t>();
  TANDEM_ASSIGN_OR_RETURN(c.alpha, GetNumber(j, "lora_alpha", source));
  if (j.contains("lora_dropout")) {
    TANDEM_ASSIGN_OR_RETURN(c.dropout, GetNumber(j, "lora_dropout", source));
  }
  if (j.contains("use_rslora")) {
    if (!j["use_rslora"].is_boolean()) {
      return InvalidArgumentError(
          StrCat(source, ": \"use_rslora\" must be a boolean, found ", j["use_rslora"].dump()));
    }
    c.use_rslora = j["use_rslora"].get<bool>();
  }
  if (j.contains("base_model_name_or_path") && j["base_model_name_or_path"].is_string()) {
    c.base_model_name_or_path = j["base_model_name_or_path"].get<std::string>();
  }
  TANDEM_RETURN_IF_ERROR(ParseTargets(j, source, c));
  TANDEM_RETURN_IF_ERROR(ParsePatterns(j, source, c));
  return c;
}

StatusOr<LoraConfig> LoadLoraConfig(const std::string& path) {
  std::string file = path;
  if (std::filesystem::is_directory(path)) file = path + "/" + kAdapterConfigFile;
  std::ifstream in(file, std::ios::binary);
  if (!in) return NotFoundError(StrCat(file, ": cannot open (no adapter_config.json?)"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseLoraConfigJson(ss.str(), file);
}

Status SaveLoraAdapter(const LoraAdapter& adapter, const std::string& dir, DType dtype) {
  const internal::AdapterDirSpec spec{"SaveLoraAdapter", kAdapterWeightsFile, "pt",
                                      kAdapterConfigFile, LoraConfigToJson(adapter.config())};
  if (adapter.parallel().tp_size <= 1) {
    return internal::WriteAdapterDir(spec, dir, dtype, adapter.parameters(),
                                     [&](size_t i) { return adapter.ToHost(i); });
  }
  std::vector<Tensor> whole;  // every tp rank takes part in each gather, in parameter order
  for (size_t i = 0; i < adapter.parameters().size(); ++i) {
    TANDEM_ASSIGN_OR_RETURN(Tensor t, adapter.GatherToHost(i));
    whole.push_back(std::move(t));
  }
  if (adapter.parallel().tp_rank != 0) return Status::Ok();
  return internal::WriteAdapterDir(spec, dir, dtype, adapter.parameters(),
                                   [&](size_t i) -> StatusOr<Tensor> { return whole[i]; });
}

namespace {

// <dir>/adapter_model.safetensors, or NotFound / Unimplemented (a pickled adapter_model.bin).
StatusOr<std::string> AdapterWeightsPath(const std::string& dir) {
  const std::string path = StrCat(dir, "/", kAdapterWeightsFile);
  if (std::filesystem::exists(path)) return path;
  if (std::filesystem::exists(StrCat(dir, "/adapter_model.bin"))) {
    return UnimplementedError(StrCat(dir,
                                     "/adapter_model.bin: pickled adapters are not read; "
                                     "save the adapter with safe_serialization=True"));
  }
  return NotFoundError(StrCat(path, ": no such file"));
}

// The file holds exactly the targets' A and B tensors, with their shapes, in a floating dtype.
Status CheckAdapterTensors(const model::SafetensorsCheckpoint& file, const std::string& path,
                           const std::string& config_path, const std::vector<LoraTarget>& targets,
                           const model::LlamaConfig& base) {
  std::set<std::string> expected;
  for (const LoraTarget& t : targets) {
    for (bool b : {false, true}) expected.insert(LoraParameterName(t, b));
  }
  for (const std::string& name : file.names()) {
    if (expected.count(name) != 0) continue;
    return InvalidArgumentError(StrCat(path, ": unexpected tensor '", name,
                                       "': ", UnexpectedTensorHint(name, base.num_hidden_layers)));
  }
  for (const LoraTarget& t : targets) {
    for (bool b : {false, true}) {
      const std::string name = LoraParameterName(t, b);
      const Shape shape = b ? Shape{t.out, t.rank} : Shape{t.rank, t.in};
      const model::SafetensorsTensorInfo* info = file.Find(name);
      if (info == nullptr) {
        return NotFoundError(StrCat(path, ": missing tensor '", name, "' (", t.module,
                                    " is a target of ", config_path, ")"));
      }
      if (info->shape != shape) {
        return InvalidArgumentError(StrCat(path, ": tensor '", name, "' has shape ",
                                           ShapeToString(info->shape), ", expected ",
                                           ShapeToString(shape), " (rank ", t.rank, " from ",
                                           config_path, ", in=", t.in, ", out=", t.out,
                                           " from the base model): the adapter was made for a "
                                           "different base model or rank"));
      }
      if (info->dtype != DType::kF32 && info->dtype != DType::kBF16 && info->dtype != DType::kF16) {
        return InvalidArgumentError(StrCat(path, ": tensor '", name, "' is ",
                                           model::SafetensorsDTypeName(info->dtype),
                                           ", expected F32, BF16 or F16"));
      }
    }
  }
  return Status::Ok();
}

}  // namespace

StatusOr<LoraAdapterInfo> CheckLoraAdapterDir(const model::LlamaConfig& base,
                                              const std::string& dir) {
  LoraAdapterInfo info;
  TANDEM_ASSIGN_OR_RETURN(info.config, LoadLoraConfig(dir));
  const std::string config_path = StrCat(dir, "/", kAdapterConfigFile);
  TANDEM_RETURN_IF_ERROR(model::ValidateLlamaConfig(base, "CheckLoraAdapterDir base config"));
  StatusOr<std::vector<LoraTarget>> targets = ResolveLoraTargets(info.config, base);
  if (!targets.ok()) return targets.status().WithContext(config_path);
  info.targets = std::move(targets).value();
  TANDEM_ASSIGN_OR_RETURN(const std::string path, AdapterWeightsPath(dir));
  TANDEM_ASSIGN_OR_RETURN(model::SafetensorsCheckpoint file,
                          model::SafetensorsCheckpoint::Open(path));
  TANDEM_RETURN_IF_ERROR(CheckAdapterTensors(file, path, config_path, info.targets, base));
  return info;
}

StatusOr<std::unique_ptr<LoraAdapter>> LoadLoraAdapter(ops::Context& ctx,
                                                       const model::LlamaConfig& base,
                                                       const std::string& dir,
                                                       const LoraParallel& parallel) {
  TANDEM_ASSIGN_OR_RETURN(LoraConfig config, LoadLoraConfig(dir));
  const std::string config_path = StrCat(dir, "/", kAdapterConfigFile);
  StatusOr<std::unique_ptr<LoraAdapter>> made = LoraAdapter::Create(ctx, base, config, parallel);
  if (!made.ok()) return made.status().WithContext(config_path);
  std::unique_ptr<LoraAdapter> adapter = std::move(made).value();
  TANDEM_ASSIGN_OR_RETURN(const std::string path, AdapterWeightsPath(dir));
  TANDEM_ASSIGN_OR_RETURN(model::SafetensorsCheckpoint file,
                          model::SafetensorsCheckpoint::Open(path));
  TANDEM_RETURN_IF_ERROR(CheckAdapterTensors(file, path, config_path, adapter->targets(), base));
  for (size_t i = 0; i < adapter->parameters().size(); ++i) {
    const model::Parameter& p = adapter->parameters()[i];
    TANDEM_ASSIGN_OR_RETURN(Tensor host, file.GetFloat(p.name, p.logical_shape));
    TANDEM_RETURN_IF_ERROR(adapter->SetFromLogicalHost(i, host));
  }
  return adapter;
}

}  // namespace tandem::peft
