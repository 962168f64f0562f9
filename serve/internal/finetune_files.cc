// Fine-tuning job files: job.json and the state file's metadata line
// (serve/internal/finetune_job.h).
#include <filesystem>
#include <fstream>

#include "serve/internal/finetune_job.h"

namespace tandem::serve::internal {

namespace fs = std::filesystem;
using nlohmann::json;

FineTuneProgress ProgressFromJson(const json& meta) {
  FineTuneProgress p;
  p.step = meta.value("step", int64_t{0});
  p.epoch = meta.value("epoch", int64_t{0});
  p.pos = meta.value("pos", int64_t{0});
  p.trained_tokens = meta.value("trained_tokens", int64_t{0});
  p.loss = meta.value("loss", 0.0);
  p.step_losses = meta.value("step_losses", std::vector<double>{});
  p.published = meta.value("published", std::vector<std::string>{});
  return p;
}

StatusOr<FineTuneStateMeta> ReadFineTuneStateMeta(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFoundError(StrCat("fine-tuning state ", path, " does not exist"));
  std::string magic, line;
  std::getline(in, magic);
  std::getline(in, line);
  json meta = json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (magic.rfind("tandem-finetune-state ", 0) != 0 || meta.is_discarded() || !meta.is_object()) {
    return InvalidArgumentError(StrCat(path, ": not a tandem fine-tuning state file"));
  }
  FineTuneStateMeta m;
  m.status = meta.value("status", std::string("running"));
  m.error = meta.value("error", std::string());
  m.progress = ProgressFromJson(meta);
  return m;
}

json HyperparametersToJson(const FineTuneHyperparameters& h) {
  return {{"n_epochs", h.n_epochs},
          {"batch_size", h.batch_size},
          {"learning_rate", h.learning_rate},
          {"lora_r", h.lora_r},
          {"lora_alpha", h.lora_alpha},
          {"target_modules", h.target_modules},
          {"heads_fraction", h.heads_fraction},
          {"ffn_fraction", h.ffn_fraction},
          {"selection", h.selection},
          {"coupled", h.coupled},
          {"publish_every_steps", h.publish_every_steps},
          {"seed", h.seed}};
}

StatusOr<FineTuneHyperparameters> HyperparametersFromJson(const json& j) {
  FineTuneHyperparameters h;
  try {
    h.n_epochs = j.at("n_epochs").get<int64_t>();
    h.batch_size = j.at("batch_size").get<int64_t>();
    h.learning_rate = j.at("learning_rate").get<double>();
    h.lora_r = j.at("lora_r").get<int64_t>();
    h.lora_alpha = j.at("lora_alpha").get<double>();
    h.target_modules = j.at("target_modules").get<std::vector<std::string>>();
    // Absent from job files written before S2FT jobs: the defaults.
    h.heads_fraction = j.value("heads_fraction", h.heads_fraction);
    h.ffn_fraction = j.value("ffn_fraction", h.ffn_fraction);
    h.selection = j.value("selection", h.selection);
    h.coupled = j.value("coupled", h.coupled);
    h.publish_every_steps = j.at("publish_every_steps").get<int64_t>();
    h.seed = j.at("seed").get<uint64_t>();
  } catch (const std::exception& e) {
    return InvalidArgumentError(StrCat("hyperparameters ", j.dump(), ": ", e.what()));
  }
  return h;
}

namespace {

Status WriteAtomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << text;
    out.flush();
    if (!out) return InternalError(StrCat("cannot write ", tmp));
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return InternalError(StrCat("rename ", tmp, " -> ", path, ": ", ec.message()));
  return Status::Ok();
}

StatusOr<json> ReadJson(const std::string& path) {
  std::ifstream in(path);
  if (!in) return NotFoundError(StrCat(path, " does not exist"));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return InvalidArgumentError(StrCat(path, ": expected a JSON object"));
  }
  return j;
}

}  // namespace

Status WriteJobFile(const std::string& dir, const FineTuneJobInfo& info,
                    const FineTuneJobSpec& spec) {
  json examples = json::array();
  for (const FineTuneExample& e : spec.examples) {
    examples.push_back({{"tokens", e.tokens}, {"loss_from", e.loss_from}});
  }
  json j = {{"id", info.id},
            {"created_at", info.created_at},
            {"training_file", spec.training_file},
            {"adapter", spec.adapter},
            {"method", spec.method},
            {"hyperparameters", HyperparametersToJson(spec.hyper)},
            {"examples", std::move(examples)}};
  return WriteAtomically(dir + "/job.json", j.dump() + "\n");
}

Status WriteFinalFile(const std::string& dir, const FineTuneJobInfo& info) {
  json j = {{"status", info.status}, {"error", info.error}, {"finished_at", info.finished_at}};
  return WriteAtomically(dir + "/final.json", j.dump() + "\n");
}

Status ReadJobFiles(const std::string& dir, FineTuneJobSpec* spec, FineTuneJobInfo* info) {
  std::string file = dir + "/job.json";  // the file being read, for errors
  TANDEM_ASSIGN_OR_RETURN(json j, ReadJson(file));
  try {
    info->id = j.at("id").get<std::string>();
    info->created_at = j.at("created_at").get<int64_t>();
    spec->training_file = j.at("training_file").get<std::string>();
    spec->adapter = j.at("adapter").get<std::string>();
    spec->method = j.at("method").get<std::string>();
    StatusOr<FineTuneHyperparameters> hyper = HyperparametersFromJson(j.at("hyperparameters"));
    if (!hyper.ok()) return InvalidArgumentError(StrCat(file, ": ", hyper.status().message()));
    spec->hyper = std::move(hyper).value();
    spec->examples.clear();
    for (const json& e : j.at("examples")) {
      spec->examples.push_back(
          {e.at("tokens").get<std::vector<int32_t>>(), e.at("loss_from").get<int64_t>()});
    }
    info->status = "queued";
    if (fs::exists(dir + "/final.json")) {
      file = dir + "/final.json";
      TANDEM_ASSIGN_OR_RETURN(json final, ReadJson(file));
      info->status = final.at("status").get<std::string>();
      info->error = final.at("error").get<std::string>();
      info->finished_at = final.at("finished_at").get<int64_t>();
    }
  } catch (const std::exception& e) {
    return InvalidArgumentError(StrCat(file, ": ", e.what()));
  }
  return Status::Ok();
}

}  // namespace tandem::serve::internal
