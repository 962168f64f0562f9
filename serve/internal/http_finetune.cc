// The fine-tuning endpoints (serve/internal/http_finetune.h).
#include "serve/internal/http_finetune.h"

#include <limits.h>
#include <stdlib.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <set>

#include "serve/finetune.h"
#include "serve/internal/http_generation.h"

namespace tandem::serve::internal {
namespace {

using nlohmann::json;

const std::set<std::string> kHyperKeys = {"n_epochs",       "batch_size",          "learning_rate",
                                          "lora_r",         "lora_alpha",          "target_modules",
                                          "heads_fraction", "ffn_fraction",        "selection",
                                          "coupled",        "publish_every_steps", "seed"};
// OpenAI keys accepted and ignored.
const std::set<std::string> kIgnoredKeys = {"metadata", "integrations", "validation_file"};

std::optional<ApiError> IntField(const json& v, const std::string& key, int64_t min, bool auto_ok,
                                 int64_t* out) {
  if (auto_ok && v.is_string() && v.get<std::string>() == "auto") return std::nullopt;
  if (!v.is_number_integer() || v.get<int64_t>() < min) {
    return BadRequest(StrCat("'", key, "' must be an integer >= ", min,
                             auto_ok ? " or \"auto\"" : "", ", found ", v.dump()),
                      key);
  }
  *out = v.get<int64_t>();
  return std::nullopt;
}

std::optional<ApiError> PositiveNumber(const json& v, const std::string& key, bool auto_ok,
                                       double* out) {
  if (auto_ok && v.is_string() && v.get<std::string>() == "auto") return std::nullopt;
  if (!v.is_number() || !(v.get<double>() > 0) || !std::isfinite(v.get<double>())) {
    return BadRequest(StrCat("'", key, "' must be a positive number, found ", v.dump()), key);
  }
  *out = v.get<double>();
  return std::nullopt;
}

std::optional<ApiError> ApplyHyper(const std::string& key, const json& v,
                                   FineTuneHyperparameters* h) {
  if (key == "n_epochs") return IntField(v, key, 1, true, &h->n_epochs);
  if (key == "batch_size") return IntField(v, key, 1, true, &h->batch_size);
  if (key == "lora_r") return IntField(v, key, 1, false, &h->lora_r);
  if (key == "publish_every_steps") return IntField(v, key, 0, false, &h->publish_every_steps);
  if (key == "seed") {
    int64_t seed = 0;
    if (auto e = IntField(v, key, 0, false, &seed)) return e;
    h->seed = static_cast<uint64_t>(seed);
    return std::nullopt;
  }
  if (key == "learning_rate") return PositiveNumber(v, key, true, &h->learning_rate);
  if (key == "heads_fraction" || key == "ffn_fraction") {
    if (!v.is_number() || !(v.get<double>() >= 0 && v.get<double>() <= 1)) {
      return BadRequest(StrCat("'", key, "' must be a number in [0, 1], found ", v.dump()), key);
    }
    (key == "heads_fraction" ? h->heads_fraction : h->ffn_fraction) = v.get<double>();
    return std::nullopt;
  }
  if (key == "coupled") {
    if (!v.is_boolean()) {
      return BadRequest(StrCat("'coupled' must be true or false, found ", v.dump()), key);
    }
    h->coupled = v.get<bool>();
    return std::nullopt;
  }
  if (key == "selection") {
    if (!v.is_string() || (v.get<std::string>() != "random" && v.get<std::string>() != "weight")) {
      return BadRequest(StrCat("'selection' must be \"random\" or \"weight\", found ", v.dump()),
                        key);
    }
    h->selection = v.get<std::string>();
    return std::nullopt;
  }
  if (key == "lora_alpha") return PositiveNumber(v, key, false, &h->lora_alpha);
  // target_modules: a name or a list of names.
  std::vector<std::string> modules;
  const json list = v.is_array() ? v : json::array({v});
  for (const json& m : list) {
    if (!m.is_string() || m.get<std::string>().empty()) {
      modules.clear();
      break;
    }
    modules.push_back(m.get<std::string>());
  }
  if (modules.empty()) {
    return BadRequest(StrCat("'target_modules' must be a non-empty list of projection names ",
                             "(q_proj, ..., down_proj) or \"all-linear\", found ", v.dump()),
                      key);
  }
  h->target_modules = std::move(modules);
  return std::nullopt;
}

std::optional<ApiError> ApplyHyperObject(const json& obj, const std::string& where,
                                         FineTuneHyperparameters* h) {
  if (!obj.is_object()) return BadRequest(StrCat("'", where, "' must be an object"), where);
  for (const auto& [key, v] : obj.items()) {
    if (!kHyperKeys.count(key)) {
      return BadRequest(StrCat("unknown hyperparameter '", key, "' in ", where), key);
    }
    if (auto e = ApplyHyper(key, v, h)) return e;
  }
  return std::nullopt;
}

std::optional<ApiError> ParseMethod(const json& m, FineTuneJobSpec* spec) {
  if (!m.is_object() || !m.contains("type") || !m["type"].is_string()) {
    return BadRequest("'method' must be an object with a string 'type' (\"lora\" or \"s2ft\")",
                      "method");
  }
  spec->method = m["type"].get<std::string>();
  if (spec->method != "lora" && spec->method != "s2ft") {
    return BadRequest(
        StrCat("method.type must be \"lora\" or \"s2ft\", found '", spec->method, "'"), "method");
  }
  for (const auto& [key, v] : m.items()) {
    if (key == "type") continue;
    if (key != spec->method || !v.is_object()) {
      return BadRequest(StrCat("unknown key 'method.", key, "'"), "method");
    }
    for (const auto& [k2, v2] : v.items()) {
      if (k2 != "hyperparameters") {
        return BadRequest(StrCat("unknown key 'method.", key, ".", k2, "'"), "method");
      }
      if (auto e = ApplyHyperObject(v2, "method." + key + ".hyperparameters", &spec->hyper)) {
        return e;
      }
    }
  }
  return std::nullopt;
}

// The realpath of `path` when it lies inside one of `dirs`.
std::optional<ApiError> CheckTrainingPath(const std::vector<std::string>& dirs,
                                          const std::string& path, std::string* resolved) {
  if (dirs.empty()) {
    return BadRequest(
        "fine-tuning from files is disabled: start `tandem serve` with "
        "--finetune-dir DIR",
        "training_file");
  }
  char buf[PATH_MAX];
  if (::realpath(path.c_str(), buf) == nullptr) {
    return BadRequest(StrCat("training_file '", path, "' does not resolve: ", std::strerror(errno)),
                      "training_file");
  }
  const std::string real = buf;
  std::string roots;
  for (const std::string& dir : dirs) {
    if (::realpath(dir.c_str(), buf) == nullptr) continue;
    const std::string root = buf;
    if (real.rfind(root + "/", 0) == 0) {
      *resolved = real;
      return std::nullopt;
    }
    roots += (roots.empty() ? "" : ", ") + root;
  }
  return BadRequest(StrCat("training_file '", path, "' resolves to '", real,
                           "', outside the fine-tuning directories (", roots, ")"),
                    "training_file");
}

void SendJson(const json& j, httplib::Response* res) {
  res->set_content(DumpJson(j), "application/json");
}

}  // namespace

std::optional<ApiError> ParseFineTuneBody(const std::string& body, const std::string& base_model,
                                          FineTuneJobSpec* spec) {
  json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return BadRequest("the body must be a JSON object");
  for (const auto& [key, v] : j.items()) {
    if (kHyperKeys.count(key)) {
      if (auto e = ApplyHyper(key, v, &spec->hyper)) return e;
    } else if (key == "hyperparameters") {
      if (auto e = ApplyHyperObject(v, key, &spec->hyper)) return e;
    } else if (key == "method") {
      if (auto e = ParseMethod(v, spec)) return e;
    } else if (key == "model") {
      if (!v.is_string() || v.get<std::string>() != base_model) {
        return ApiError{404,
                        StrCat("fine-tuning trains adapters of the base model '", base_model,
                               "', found model ", v.dump()),
                        "invalid_request_error", "model", "model_not_found"};
      }
    } else if (key == "training_file" || key == "suffix" || key == "adapter") {
      if (!v.is_string() || v.get<std::string>().empty()) {
        return BadRequest(StrCat("'", key, "' must be a non-empty string"), key);
      }
    } else if (!kIgnoredKeys.count(key) || (key == "validation_file" && !v.is_null())) {
      return BadRequest(StrCat("unsupported key '", key, "'"), key);
    }
  }
  if (!j.contains("training_file")) {
    return BadRequest("'training_file' (a JSONL file under --finetune-dir) is required",
                      "training_file");
  }
  spec->training_file = j["training_file"].get<std::string>();
  const std::string suffix = j.value("suffix", ""), adapter = j.value("adapter", "");
  if (suffix.empty() && adapter.empty()) {
    return BadRequest("'suffix' or 'adapter' (the name to publish the adapter under) is required",
                      "suffix");
  }
  if (!suffix.empty() && !adapter.empty() && suffix != adapter) {
    return BadRequest("'suffix' and 'adapter' name the same thing and differ", "suffix");
  }
  spec->adapter = adapter.empty() ? suffix : adapter;
  return std::nullopt;
}

json FineTuneJobJson(const FineTuneJobInfo& job, const std::string& base_model) {
  const FineTuneHyperparameters& h = job.spec.hyper;
  json hyper = {{"n_epochs", h.n_epochs},
                {"batch_size", h.batch_size},
                {"learning_rate", h.learning_rate},
                {"publish_every_steps", h.publish_every_steps}};
  if (job.spec.method == "s2ft") {
    hyper["heads_fraction"] = h.heads_fraction;
    hyper["ffn_fraction"] = h.ffn_fraction;
    hyper["selection"] = h.selection;
    hyper["coupled"] = h.coupled;
  } else {
    hyper["lora_r"] = h.lora_r;
    hyper["lora_alpha"] = h.lora_alpha;
    hyper["target_modules"] = h.target_modules;
  }
  json error = nullptr;
  if (job.status == "failed") {
    error = {{"code", "job_failed"}, {"message", job.error}, {"param", nullptr}};
  }
  return {{"object", "fine_tuning.job"},
          {"id", job.id},
          {"model", base_model},
          {"created_at", job.created_at},
          {"finished_at", job.finished_at > 0 ? json(job.finished_at) : json(nullptr)},
          {"fine_tuned_model", job.published.empty() ? json(nullptr) : json(job.published.back())},
          {"organization_id", "tandem"},
          {"result_files", json::array()},
          {"status", job.status},
          {"validation_file", nullptr},
          {"training_file", job.spec.training_file},
          {"hyperparameters", hyper},
          {"method", {{"type", job.spec.method}, {job.spec.method, {{"hyperparameters", hyper}}}}},
          {"trained_tokens", job.trained_tokens},
          {"error", error},
          {"seed", h.seed},
          {"suffix", job.spec.adapter},
          {"step", job.step},
          {"total_steps", job.total_steps},
          {"epoch", job.epoch},
          {"loss", job.step > 0 ? json(job.loss) : json(nullptr)},
          {"published_versions", job.published},
          {"num_examples", job.num_examples},
          {"resumed", job.resumed}};
}

void HandleCreateFineTuneJob(const FineTuneHttpContext& ctx, const httplib::Request& req,
                             httplib::Response* res) {
  FineTuneJobSpec spec;
  const std::string& base = ctx.engine->base_model_name();
  if (auto e = ParseFineTuneBody(req.body, base, &spec)) return SendError(*e, res);
  std::string resolved;
  if (auto e = CheckTrainingPath(ctx.finetune_dirs, spec.training_file, &resolved)) {
    return SendError(*e, res);
  }
  StatusOr<std::vector<FineTuneExample>> examples = ReadFineTuneFile(
      resolved, ctx.engine->tokenizer(), ctx.chat_template, ctx.engine->max_model_len());
  if (!examples.ok())
    return SendError(BadRequest(examples.status().message(), "training_file"), res);
  spec.training_file = resolved;
  spec.examples = std::move(*examples);
  StatusOr<FineTuneJobInfo> job = ctx.engine->CreateFineTuneJob(std::move(spec));
  if (!job.ok()) return SendError(ErrorFromStatus(job.status()), res);
  SendJson(FineTuneJobJson(*job, base), res);
}

void HandleListFineTuneJobs(const FineTuneHttpContext& ctx, httplib::Response* res) {
  json data = json::array();
  for (const FineTuneJobInfo& job : ctx.engine->ListFineTuneJobs()) {
    data.push_back(FineTuneJobJson(job, ctx.engine->base_model_name()));
  }
  SendJson({{"object", "list"}, {"data", data}, {"has_more", false}}, res);
}

void HandleGetFineTuneJob(const FineTuneHttpContext& ctx, const std::string& id,
                          httplib::Response* res) {
  StatusOr<FineTuneJobInfo> job = ctx.engine->GetFineTuneJob(id);
  if (!job.ok()) {
    return SendError({404, job.status().message(), "invalid_request_error", "id", ""}, res);
  }
  SendJson(FineTuneJobJson(*job, ctx.engine->base_model_name()), res);
}

void HandleCancelFineTuneJob(const FineTuneHttpContext& ctx, const std::string& id,
                             httplib::Response* res) {
  StatusOr<FineTuneJobInfo> job = ctx.engine->CancelFineTuneJob(id);
  if (!job.ok()) {
    return SendError({404, job.status().message(), "invalid_request_error", "id", ""}, res);
  }
  SendJson(FineTuneJobJson(*job, ctx.engine->base_model_name()), res);
}

}  // namespace tandem::serve::internal
