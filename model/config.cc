#include "model/config.h"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace tandem::model {

using nlohmann::json;

namespace {

const char* JsonTypeName(const json& j) { return j.type_name(); }

// Reads the keys of one JSON object, naming the source and the key in every error.
class KeyReader {
 public:
  KeyReader(const json& object, std::string source) : obj_(object), source_(std::move(source)) {}

  bool Has(const char* key) const { return obj_.contains(key) && !obj_.at(key).is_null(); }

  Status Error(const char* key, const std::string& what) const {
    return InvalidArgumentError(StrCat(source_, ": key '", key, "': ", what));
  }
  Status Missing(const char* key) const {
    return InvalidArgumentError(StrCat(source_, ": missing required key '", key, "'"));
  }

  // An integer value; `required` keys must be present (and non-null).
  Status Int(const char* key, bool required, int64_t* out) const {
    if (!Has(key)) return required ? Missing(key) : Status::Ok();
    const json& v = obj_.at(key);
    if (!v.is_number_integer()) {
      return Error(key, StrCat("expected an integer, found ", JsonTypeName(v), " ", v.dump()));
    }
    *out = v.get<int64_t>();
    return Status::Ok();
  }
  Status Number(const char* key, bool required, double* out) const {
    if (!Has(key)) return required ? Missing(key) : Status::Ok();
    const json& v = obj_.at(key);
    if (!v.is_number()) {
      return Error(key, StrCat("expected a number, found ", JsonTypeName(v), " ", v.dump()));
    }
    *out = v.get<double>();
    return Status::Ok();
  }
  Status Bool(const char* key, bool* out) const {
    if (!Has(key)) return Status::Ok();
    const json& v = obj_.at(key);
    if (!v.is_boolean()) {
      return Error(key, StrCat("expected true or false, found ", JsonTypeName(v), " ", v.dump()));
    }
    *out = v.get<bool>();
    return Status::Ok();
  }
  Status String(const char* key, std::string* out) const {
    if (!Has(key)) return Status::Ok();
    const json& v = obj_.at(key);
    if (!v.is_string()) {
      return Error(key, StrCat("expected a string, found ", JsonTypeName(v), " ", v.dump()));
    }
    *out = v.get<std::string>();
    return Status::Ok();
  }
  // An int32 token id, or a list of them (the first is the primary one).
  Status TokenIds(const char* key, std::vector<int32_t>* out) const {
    if (!Has(key)) return Status::Ok();
    const json& v = obj_.at(key);
    auto one = [&](const json& e) -> Status {
      if (!e.is_number_integer() || e.get<int64_t>() < 0 || e.get<int64_t>() > INT32_MAX) {
        return Error(key, StrCat("expected a non-negative int32 token id, found ", e.dump()));
      }
      out->push_back(static_cast<int32_t>(e.get<int64_t>()));
      return Status::Ok();
    };
    if (v.is_array()) {
      for (const json& e : v) TANDEM_RETURN_IF_ERROR(one(e));
      return Status::Ok();
    }
    return one(v);
  }

 private:
  const json& obj_;
  std::string source_;
};

// Rejects the parts of HF's Llama family tandem does not implement.
Status CheckSupported(const KeyReader& r, const json& j) {
  if (r.Has("architectures")) {
    const json& a = j.at("architectures");
    if (!a.is_array()) return r.Error("architectures", "expected a list of strings");
    for (const json& e : a) {
      if (!e.is_string() || e.get<std::string>() != "LlamaForCausalLM") {
        return r.Error("architectures", StrCat("unsupported architecture ", e.dump(),
                                               " (supported: \"LlamaForCausalLM\")"));
      }
    }
  }
  std::string model_type = "llama";
  TANDEM_RETURN_IF_ERROR(r.String("model_type", &model_type));
  if (model_type != "llama") {
    return r.Error("model_type",
                   StrCat("unsupported model_type \"", model_type, "\" (supported: \"llama\")"));
  }
  std::string act = "silu";
  TANDEM_RETURN_IF_ERROR(r.String("hidden_act", &act));
  if (act != "silu") {
    return r.Error("hidden_act", StrCat("unsupported activation \"", act,
                                        "\" (tandem's Llama MLP is SwiGLU: \"silu\" only)"));
  }
  for (const char* key : {"attention_bias", "mlp_bias"}) {
    bool bias = false;
    TANDEM_RETURN_IF_ERROR(r.Bool(key, &bias));
    if (bias) return r.Error(key, "biases are not supported (expected false, found true)");
  }
  return Status::Ok();
}

// Rope settings live in "rope_scaling" (plus a top-level "rope_theta") up to transformers 4.x,
// and in "rope_parameters" (holding "rope_theta" too) from transformers 5; `key` names which.
Status ParseRopeScaling(const json& j, const char* key, const std::string& source, double* theta,
                        RopeScaling* out) {
  if (!j.contains(key) || j.at(key).is_null()) return Status::Ok();
  const json& rs = j.at(key);
  const std::string where = StrCat(source, ": ", key);
  if (!rs.is_object()) {
    return InvalidArgumentError(
        StrCat(source, ": key '", key, "': expected an object or null, found ", JsonTypeName(rs)));
  }
  KeyReader r(rs, where);
  TANDEM_RETURN_IF_ERROR(r.Number("rope_theta", false, theta));
  std::string type;
  TANDEM_RETURN_IF_ERROR(r.String("type", &type));  // older configs
  TANDEM_RETURN_IF_ERROR(r.String("rope_type", &type));
  if (type.empty() || type == "default") return Status::Ok();
  if (type != "llama3") {
    return r.Error("rope_type", StrCat("unsupported rope type \"", type,
                                       "\" (supported: \"default\", \"llama3\")"));
  }
  out->rope_type = "llama3";
  TANDEM_RETURN_IF_ERROR(r.Number("factor", true, &out->factor));
  TANDEM_RETURN_IF_ERROR(r.Number("low_freq_factor", true, &out->low_freq_factor));
  TANDEM_RETURN_IF_ERROR(r.Number("high_freq_factor", true, &out->high_freq_factor));
  TANDEM_RETURN_IF_ERROR(
      r.Int("original_max_position_embeddings", true, &out->original_max_position_embeddings));
  return Status::Ok();
}

StatusOr<LlamaConfig> ParseObject(const json& j, const std::string& source) {
  if (!j.is_object()) {
    return InvalidArgumentError(
        StrCat(source, ": expected a JSON object, found ", JsonTypeName(j)));
  }
  KeyReader r(j, source);
  TANDEM_RETURN_IF_ERROR(CheckSupported(r, j));
  LlamaConfig c;
  TANDEM_RETURN_IF_ERROR(r.Int("vocab_size", true, &c.vocab_size));
  TANDEM_RETURN_IF_ERROR(r.Int("hidden_size", true, &c.hidden_size));
  TANDEM_RETURN_IF_ERROR(r.Int("intermediate_size", true, &c.intermediate_size));
  TANDEM_RETURN_IF_ERROR(r.Int("num_hidden_layers", true, &c.num_hidden_layers));
  TANDEM_RETURN_IF_ERROR(r.Int("num_attention_heads", true, &c.num_attention_heads));
  c.num_key_value_heads = c.num_attention_heads;
  TANDEM_RETURN_IF_ERROR(r.Int("num_key_value_heads", false, &c.num_key_value_heads));
  TANDEM_RETURN_IF_ERROR(r.Int("head_dim", false, &c.head_dim));  // 0 (absent): C / Hq
  TANDEM_RETURN_IF_ERROR(r.Number("rope_theta", false, &c.rope_theta));
  TANDEM_RETURN_IF_ERROR(
      ParseRopeScaling(j, "rope_scaling", source, &c.rope_theta, &c.rope_scaling));
  TANDEM_RETURN_IF_ERROR(
      ParseRopeScaling(j, "rope_parameters", source, &c.rope_theta, &c.rope_scaling));
  TANDEM_RETURN_IF_ERROR(r.Number("rms_norm_eps", false, &c.rms_norm_eps));
  TANDEM_RETURN_IF_ERROR(r.Bool("tie_word_embeddings", &c.tie_word_embeddings));
  TANDEM_RETURN_IF_ERROR(r.Int("max_position_embeddings", false, &c.max_position_embeddings));
  std::vector<int32_t> bos;
  TANDEM_RETURN_IF_ERROR(r.TokenIds("bos_token_id", &bos));
  if (!bos.empty()) c.bos_token_id = bos[0];
  TANDEM_RETURN_IF_ERROR(r.TokenIds("eos_token_id", &c.eos_token_ids));
  if (!c.eos_token_ids.empty()) c.eos_token_id = c.eos_token_ids[0];
  TANDEM_RETURN_IF_ERROR(r.String("torch_dtype", &c.torch_dtype));
  TANDEM_RETURN_IF_ERROR(r.String("dtype", &c.torch_dtype));  // newer transformers
  TANDEM_RETURN_IF_ERROR(ValidateLlamaConfig(c, source));
  if (c.head_dim == 0) c.head_dim = c.hidden_size / c.num_attention_heads;
  return c;
}

}  // namespace

int64_t LlamaConfig::NumParameters() const {
  const int64_t d =
      head_dim > 0 ? head_dim : hidden_size / std::max<int64_t>(num_attention_heads, 1);
  const int64_t c = hidden_size;
  const int64_t attn = c * num_attention_heads * d * 2 + c * num_key_value_heads * d * 2;
  const int64_t mlp = 3 * c * intermediate_size;
  const int64_t per_layer = attn + mlp + 2 * c;
  const int64_t embed = vocab_size * c;
  return embed + num_hidden_layers * per_layer + c + (tie_word_embeddings ? 0 : embed);
}

Status ValidateLlamaConfig(const LlamaConfig& c, const std::string& source) {
  auto bad = [&](const char* key, const std::string& what) {
    return InvalidArgumentError(StrCat(source, ": key '", key, "': ", what));
  };
  const std::pair<const char*, int64_t> positive[] = {
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"max_position_embeddings", c.max_position_embeddings},
  };
  for (const auto& [key, value] : positive) {
    if (value <= 0) return bad(key, StrCat("expected a positive integer, found ", value));
  }
  if (c.vocab_size > INT32_MAX) return bad("vocab_size", "token ids must fit in int32");
  if (c.head_dim == 0 && c.hidden_size % c.num_attention_heads != 0) {
    return bad("num_attention_heads",
               StrCat("hidden_size ", c.hidden_size, " is not divisible by num_attention_heads ",
                      c.num_attention_heads, " (and no head_dim is given)"));
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return bad("num_key_value_heads",
               StrCat("num_attention_heads ", c.num_attention_heads,
                      " is not divisible by num_key_value_heads ", c.num_key_value_heads));
  }
  const int64_t d = c.head_dim != 0 ? c.head_dim : c.hidden_size / c.num_attention_heads;
  if (d <= 0 || d % 2 != 0) {
    return bad("head_dim", StrCat("expected a positive even head dimension (RoPE rotates pairs), "
                                  "found ",
                                  d));
  }
  if (!(c.rope_theta > 0)) return bad("rope_theta", StrCat("expected > 0, found ", c.rope_theta));
  if (!(c.rms_norm_eps > 0)) {
    return bad("rms_norm_eps", StrCat("expected > 0, found ", c.rms_norm_eps));
  }
  const RopeScaling& rs = c.rope_scaling;
  if (!rs.rope_type.empty()) {
    if (rs.rope_type != "llama3") {
      return bad("rope_scaling", StrCat("unsupported rope type \"", rs.rope_type,
                                        "\" (supported: \"default\", \"llama3\")"));
    }
    if (!(rs.factor > 0) || !(rs.low_freq_factor > 0) ||
        !(rs.high_freq_factor > rs.low_freq_factor) || rs.original_max_position_embeddings <= 0) {
      return bad("rope_scaling",
                 StrCat("expected factor > 0, 0 < low_freq_factor < high_freq_factor and "
                        "original_max_position_embeddings > 0, found factor ",
                        rs.factor, ", low_freq_factor ", rs.low_freq_factor, ", high_freq_factor ",
                        rs.high_freq_factor, ", original_max_position_embeddings ",
                        rs.original_max_position_embeddings));
    }
  }
  return Status::Ok();
}

StatusOr<LlamaConfig> ParseLlamaConfigJson(const std::string& text,
                                           const std::string& source_name) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    return InvalidArgumentError(
        StrCat(source_name, ": malformed JSON at byte ", e.byte, ": ", e.what()));
  }
  return ParseObject(j, source_name);
}

StatusOr<LlamaConfig> LoadLlamaConfig(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFoundError(StrCat("model config '", path, "' cannot be opened (missing?)"));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return InternalError(StrCat("reading model config '", path, "' failed"));
  return ParseLlamaConfigJson(text.str(), path);
}

std::string LlamaConfigToJson(const LlamaConfig& c) {
  json j;
  j["architectures"] = json::array({"LlamaForCausalLM"});
  j["model_type"] = "llama";
  j["hidden_act"] = "silu";
  j["attention_bias"] = false;
  j["mlp_bias"] = false;
  j["attention_dropout"] = 0.0;
  j["initializer_range"] = 0.02;
  j["pretraining_tp"] = 1;
  j["use_cache"] = true;
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["head_dim"] = c.head_dim != 0 ? c.head_dim : c.hidden_size / c.num_attention_heads;
  j["rope_theta"] = c.rope_theta;
  if (c.rope_scaling.rope_type.empty()) {
    j["rope_scaling"] = nullptr;
  } else {
    const RopeScaling& rs = c.rope_scaling;
    j["rope_scaling"] = {{"rope_type", rs.rope_type},
                         {"factor", rs.factor},
                         {"low_freq_factor", rs.low_freq_factor},
                         {"high_freq_factor", rs.high_freq_factor},
                         {"original_max_position_embeddings", rs.original_max_position_embeddings}};
  }
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["bos_token_id"] = c.bos_token_id ? json(*c.bos_token_id) : json(nullptr);
  if (c.eos_token_ids.size() > 1) {
    j["eos_token_id"] = c.eos_token_ids;
  } else if (c.eos_token_id) {
    j["eos_token_id"] = *c.eos_token_id;
  } else {
    j["eos_token_id"] = nullptr;
  }
  j["torch_dtype"] = c.torch_dtype;
  return j.dump(2) + "\n";
}

Status SaveLlamaConfig(const LlamaConfig& config, const std::string& path) {
  TANDEM_RETURN_IF_ERROR(ValidateLlamaConfig(config, path));
  const std::string text = LlamaConfigToJson(config);
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return InternalError(StrCat("cannot create '", tmp, "' to write the model config"));
    out << text;
    out.flush();
    if (!out) return InternalError(StrCat("writing '", tmp, "' failed (disk full?)"));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return InternalError(StrCat("renaming '", tmp, "' to '", path, "' failed"));
  }
  return Status::Ok();
}

}  // namespace tandem::model
