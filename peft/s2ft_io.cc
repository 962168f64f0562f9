// S²FT adapter files (peft/s2ft_io.h).
#include "peft/s2ft_io.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "model/safetensors.h"
#include "peft/internal/adapter_files.h"
#include "peft/internal/s2ft_weights.h"
#include "peft/lora.h"

namespace tandem::peft {
namespace {

using Json = nlohmann::ordered_json;
constexpr char kFormat[] = "tandem-s2ft";
constexpr int64_t kFormatVersion = 1;

Json BaseJson(const model::LlamaConfig& base) {
  const internal::S2ftDims d = internal::DimsOf(base);
  Json j = Json::object();
  j["hidden_size"] = d.C;
  j["intermediate_size"] = d.F;
  j["num_hidden_layers"] = d.L;
  j["num_attention_heads"] = d.Hq;
  j["num_key_value_heads"] = d.Hkv;
  j["head_dim"] = d.D;
  return j;
}

// j[key] as an integer list.
StatusOr<std::vector<int64_t>> IntList(const Json& j, const char* key, const std::string& where) {
  if (!j.contains(key) || !j[key].is_array()) {
    return InvalidArgumentError(StrCat(where, ": \"", key, "\" must be a list of integers"));
  }
  std::vector<int64_t> out;
  for (const Json& e : j[key]) {
    if (!e.is_number_integer()) {
      return InvalidArgumentError(
          StrCat(where, ": \"", key, "\" must hold integers, found ", e.dump()));
    }
    out.push_back(e.get<int64_t>());
  }
  return out;
}

StatusOr<int64_t> Int(const Json& j, const char* key, const std::string& where) {
  if (!j.contains(key) || !j[key].is_number_integer()) {
    return InvalidArgumentError(StrCat(where, ": \"", key, "\" must be an integer, found ",
                                       j.contains(key) ? j[key].dump() : "(missing)"));
  }
  return j[key].get<int64_t>();
}

// The file's base_model against the model's architecture.
Status CheckBase(const Json& j, const model::LlamaConfig& base, const std::string& source) {
  if (!j.contains("base_model") || !j["base_model"].is_object()) {
    return InvalidArgumentError(StrCat(source, ": missing object \"base_model\""));
  }
  const Json want = BaseJson(base);
  for (const auto& [key, value] : want.items()) {
    const Json& have = j["base_model"];
    if (have.contains(key) && have[key] == value) continue;
    return InvalidArgumentError(StrCat(
        source, ": the adapter was made for a different base model: base_model.", key, " = ",
        have.contains(key) ? have[key].dump() : "(missing)", ", the model has ", value.dump()));
  }
  return Status::Ok();
}

StatusOr<S2ftSelection> ParseLayers(const Json& j, const model::LlamaConfig& base,
                                    const std::string& source) {
  if (!j.contains("layers") || !j["layers"].is_array()) {
    return InvalidArgumentError(StrCat(source, ": \"layers\" must be a list"));
  }
  S2ftSelection sel;
  sel.layers.resize(base.num_hidden_layers);
  std::set<int64_t> seen;
  for (const Json& e : j["layers"]) {
    const std::string where = StrCat(source, ": layers[", seen.size(), "]");
    TANDEM_ASSIGN_OR_RETURN(const int64_t l, Int(e, "layer", where));
    if (l < 0 || l >= base.num_hidden_layers || !seen.insert(l).second) {
      return InvalidArgumentError(StrCat(where, ": layer ", l, " is out of range [0, ",
                                         base.num_hidden_layers, ") or listed twice"));
    }
    TANDEM_ASSIGN_OR_RETURN(sel.layers[l].heads, IntList(e, "heads", where));
    TANDEM_ASSIGN_OR_RETURN(sel.layers[l].channels, IntList(e, "channels", where));
  }
  TANDEM_RETURN_IF_ERROR(NormalizeS2ftSelection(sel, base, source));
  return sel;
}

// One entry of "blocks" against the block the selection implies.
Status CheckBlock(const Json& e, const S2ftBlock& want, const std::string& where) {
  if (!e.is_object()) return InvalidArgumentError(StrCat(where, ": not an object"));
  const std::string name = e.value("name", std::string());
  const std::string proj = e.value("projection", std::string());
  const std::string axis = e.value("axis", std::string());
  TANDEM_ASSIGN_OR_RETURN(const int64_t layer, Int(e, "layer", where));
  if (name != want.name || layer != want.layer || proj != model::ProjectionName(want.proj) ||
      axis != S2ftAxisName(want.axis)) {
    return InvalidArgumentError(StrCat(where, ": block '", name, "' (layer ", layer, ", ", proj,
                                       ", ", axis, ") is not the selection's block '", want.name,
                                       "' (", S2ftAxisName(want.axis), ")"));
  }
  TANDEM_ASSIGN_OR_RETURN(std::vector<int64_t> idx, IntList(e, "indices", where));
  TANDEM_ASSIGN_OR_RETURN(const std::vector<int64_t> shape, IntList(e, "shape", where));
  std::set<int64_t> uniq;
  for (int64_t i : idx) {
    if (!uniq.insert(i).second) {
      return InvalidArgumentError(StrCat(where, " (", name, "): duplicate index ", i));
    }
  }
  if (shape != want.shape) {
    return InvalidArgumentError(StrCat(where, " (", name, "): shape ", ShapeToString(shape),
                                       ", expected ", ShapeToString(want.shape)));
  }
  if (idx != want.indices) {
    return InvalidArgumentError(StrCat(where, " (", name, "): indices do not match the ",
                                       "layer's heads/channels (expected ", want.indices.size(),
                                       " ascending indices starting at ",
                                       want.indices.empty() ? -1 : want.indices[0], ")"));
  }
  return Status::Ok();
}

// Range check of every block's indices against the projection's size along its axis.
Status CheckIndexRanges(const Json& blocks, const model::LlamaConfig& base,
                        const std::string& source) {
  for (size_t k = 0; k < blocks.size(); ++k) {
    const Json& e = blocks[k];
    if (!e.is_object() || !e.contains("projection") || !e.contains("indices")) continue;
    for (int p = 0; p < model::kNumProjections; ++p) {
      const auto proj = static_cast<model::Projection>(p);
      if (e["projection"] != model::ProjectionName(proj)) continue;
      const auto [in, out] = ProjectionShape(base, proj);
      const int64_t bound = e.value("axis", std::string()) == "rows" ? out : in;
      for (const Json& i : e["indices"]) {
        if (!i.is_number_integer() || (i.get<int64_t>() >= 0 && i.get<int64_t>() < bound)) {
          continue;
        }
        return OutOfRangeError(StrCat(source, ": blocks[", k, "] (", e.value("name", ""),
                                      "): index ", i.dump(), " is outside [0, ", bound, ")"));
      }
    }
  }
  return Status::Ok();
}

StatusOr<Json> ReadJson(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFoundError(StrCat(path, ": cannot open (not an S2FT adapter directory?)"));
  std::stringstream ss;
  ss << in.rdbuf();
  Json j = Json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return InvalidArgumentError(StrCat(path, ": not a JSON object"));
  }
  return j;
}

StatusOr<S2ftConfig> ParseConfig(const Json& j, const std::string& source) {
  if (j.value("format", std::string()) != kFormat || !j.contains("format_version") ||
      j["format_version"] != kFormatVersion) {
    return UnimplementedError(
        StrCat(source, ": format ", j.value("format", std::string("?")), " version ",
               j.contains("format_version") ? j["format_version"].dump() : "?", "; tandem reads \"",
               kFormat, "\" version ", kFormatVersion));
  }
  S2ftConfig c;
  c.selection = j.value("selection", std::string("random"));
  c.coupled = j.value("coupled", false);
  c.heads_fraction = j.value("heads_fraction", 0.0);
  c.ffn_fraction = j.value("ffn_fraction", 0.0);
  c.budget = j.value("budget", int64_t{0});
  c.seed = j.value("seed", uint64_t{0});
  if (j.contains("base_model_name_or_path") && j["base_model_name_or_path"].is_string()) {
    c.base_model_name_or_path = j["base_model_name_or_path"].get<std::string>();
  }
  TANDEM_RETURN_IF_ERROR(ValidateS2ftConfig(c).WithContext(source));
  return c;
}

StatusOr<std::unique_ptr<S2ftAdapter>> LoadImpl(ops::Context& ctx, const model::LlamaConfig& base,
                                                const std::string& dir);

}  // namespace

bool IsS2ftAdapterDir(const std::string& dir) {
  return std::filesystem::exists(std::filesystem::path(dir) / kS2ftConfigFile);
}

std::string S2ftConfigToJson(const S2ftAdapter& a) {
  const S2ftConfig& c = a.config();
  Json j = Json::object();
  j["format"] = kFormat;
  j["format_version"] = kFormatVersion;
  j["peft_type"] = "S2FT";
  j["base_model_name_or_path"] =
      c.base_model_name_or_path.empty() ? Json(nullptr) : Json(c.base_model_name_or_path);
  j["base_model"] = BaseJson(a.base_config());
  j["selection"] = c.selection;
  j["seed"] = c.seed;
  j["heads_fraction"] = c.heads_fraction;
  j["ffn_fraction"] = c.ffn_fraction;
  j["budget"] = c.budget;
  j["coupled"] = c.coupled;
  Json layers = Json::array();
  for (size_t l = 0; l < a.selection().layers.size(); ++l) {
    const S2ftLayerSelection& s = a.selection().layers[l];
    layers.push_back({{"layer", l}, {"heads", s.heads}, {"channels", s.channels}});
  }
  j["layers"] = layers;
  Json blocks = Json::array();
  for (const S2ftBlock& b : a.blocks()) {
    blocks.push_back({{"name", b.name},
                      {"layer", b.layer},
                      {"projection", model::ProjectionName(b.proj)},
                      {"axis", S2ftAxisName(b.axis)},
                      {"indices", b.indices},
                      {"shape", b.shape}});
  }
  j["blocks"] = blocks;
  return j.dump(2) + "\n";
}

Status SaveS2ftAdapter(const S2ftAdapter& adapter, const std::string& dir, DType dtype) {
  const internal::AdapterDirSpec spec{"SaveS2ftAdapter", kS2ftWeightsFile, kFormat,
                                      kS2ftConfigFile, S2ftConfigToJson(adapter)};
  return internal::WriteAdapterDir(spec, dir, dtype, adapter.parameters(),
                                   [&](size_t i) { return adapter.ToHost(i); });
}

StatusOr<std::unique_ptr<S2ftAdapter>> LoadS2ftAdapter(ops::Context& ctx,
                                                       const model::LlamaConfig& base,
                                                       const std::string& dir) {
  try {
    return LoadImpl(ctx, base, dir);
  } catch (const nlohmann::json::exception& e) {  // a value of the wrong JSON type
    return InvalidArgumentError(StrCat(dir, "/", kS2ftConfigFile, ": ", e.what()));
  }
}

namespace {

StatusOr<std::unique_ptr<S2ftAdapter>> LoadImpl(ops::Context& ctx, const model::LlamaConfig& base,
                                                const std::string& dir) {
  const std::string source = StrCat(dir, "/", kS2ftConfigFile);
  TANDEM_ASSIGN_OR_RETURN(const Json j, ReadJson(source));
  TANDEM_ASSIGN_OR_RETURN(const S2ftConfig config, ParseConfig(j, source));
  TANDEM_RETURN_IF_ERROR(CheckBase(j, base, source));
  TANDEM_ASSIGN_OR_RETURN(S2ftSelection sel, ParseLayers(j, base, source));
  if (!j.contains("blocks") || !j["blocks"].is_array()) {
    return InvalidArgumentError(StrCat(source, ": \"blocks\" must be a list"));
  }
  TANDEM_RETURN_IF_ERROR(CheckIndexRanges(j["blocks"], base, source));
  TANDEM_ASSIGN_OR_RETURN(auto adapter, S2ftAdapter::Create(ctx, base, config, std::move(sel)));
  const std::vector<S2ftBlock>& want = adapter->blocks();
  if (j["blocks"].size() != want.size()) {
    return InvalidArgumentError(StrCat(source, ": ", j["blocks"].size(), " blocks listed, the ",
                                       "selection (coupled = ", config.coupled, ") implies ",
                                       want.size()));
  }
  for (size_t k = 0; k < want.size(); ++k) {
    TANDEM_RETURN_IF_ERROR(
        CheckBlock(j["blocks"][k], want[k], StrCat(source, ": blocks[", k, "]")));
  }
  const std::string path = StrCat(dir, "/", kS2ftWeightsFile);
  TANDEM_ASSIGN_OR_RETURN(model::SafetensorsCheckpoint file,
                          model::SafetensorsCheckpoint::Open(path));
  std::set<std::string> expected;
  for (const S2ftBlock& b : want) expected.insert(b.name);
  for (const std::string& name : file.names()) {
    if (expected.count(name) == 0) {
      return InvalidArgumentError(
          StrCat(path, ": unexpected tensor '", name, "' (not a block of ", source, ")"));
    }
  }
  for (size_t i = 0; i < want.size(); ++i) {
    const model::SafetensorsTensorInfo* info = file.Find(want[i].name);
    if (info == nullptr) {
      return NotFoundError(
          StrCat(path, ": missing tensor '", want[i].name, "' (a block of ", source, ")"));
    }
    if (info->shape != want[i].shape) {
      return InvalidArgumentError(StrCat(path, ": tensor '", want[i].name, "' has shape ",
                                         ShapeToString(info->shape), ", expected ",
                                         ShapeToString(want[i].shape), " (from ", source, ")"));
    }
    TANDEM_ASSIGN_OR_RETURN(const Tensor host, file.GetFloat(want[i].name, want[i].shape));
    TANDEM_RETURN_IF_ERROR(adapter->SetFromHost(i, host));
  }
  return adapter;
}

}  // namespace

}  // namespace tandem::peft
