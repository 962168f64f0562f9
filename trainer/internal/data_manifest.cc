#include "trainer/internal/data_manifest.h"

#include <nlohmann/json.hpp>

#include "trainer/internal/data_io.h"

namespace tandem::trainer::internal {
namespace {

using nlohmann::json;

json SplitToJson(const ManifestSplit& s) {
  json shards = json::array();
  for (const ManifestShard& sh : s.shards) {
    shards.push_back({{"file", sh.file}, {"num_tokens", sh.num_tokens}});
  }
  return {{"num_tokens", s.num_tokens},
          {"num_docs", s.num_docs},
          {"num_loss_tokens", s.num_loss_tokens},
          {"shards", shards}};
}

json OptionsToJson(const PrepareOptions& o) {
  return {{"inputs", o.inputs},
          {"format", o.format},
          {"val_fraction", o.val_fraction},
          {"shard_tokens", o.shard_tokens},
          {"add_bos", o.add_bos},
          {"add_eos", o.add_eos},
          {"seed", o.seed}};
}

// Reads `key` of object `j` as T; errors name the file and the JSON path.
template <typename T>
Status Get(const json& j, const char* key, const std::string& where, T* out) {
  auto it = j.find(key);
  if (it == j.end()) return DataLossError(StrCat(where, ": missing key \"", key, "\""));
  try {
    *out = it->get<T>();
  } catch (const json::exception& e) {
    return DataLossError(StrCat(where, ": key \"", key, "\" has the wrong type (", e.what(), ")"));
  }
  return Status::Ok();
}

StatusOr<ManifestSplit> SplitFromJson(const json& j, const std::string& where) {
  if (!j.is_object()) return DataLossError(where + ": expected an object");
  ManifestSplit s;
  TANDEM_RETURN_IF_ERROR(Get(j, "num_tokens", where, &s.num_tokens));
  TANDEM_RETURN_IF_ERROR(Get(j, "num_docs", where, &s.num_docs));
  TANDEM_RETURN_IF_ERROR(Get(j, "num_loss_tokens", where, &s.num_loss_tokens));
  json shards;
  TANDEM_RETURN_IF_ERROR(Get(j, "shards", where, &shards));
  if (!shards.is_array()) return DataLossError(where + ".shards: expected an array");
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string at = StrCat(where, ".shards[", i, "]");
    if (!shards[i].is_object()) return DataLossError(at + ": expected an object");
    ManifestShard sh;
    TANDEM_RETURN_IF_ERROR(Get(shards[i], "file", at, &sh.file));
    TANDEM_RETURN_IF_ERROR(Get(shards[i], "num_tokens", at, &sh.num_tokens));
    if (sh.file.empty() || sh.file.find('/') != std::string::npos) {
      return DataLossError(StrCat(at, ": shard file '", sh.file,
                                  "' must be a plain name inside the data directory"));
    }
    s.shards.push_back(std::move(sh));
  }
  return s;
}

}  // namespace

Status WriteManifest(const std::string& path, const Manifest& m) {
  json splits = json::object();
  for (const auto& [name, split] : m.splits) splits[name] = SplitToJson(split);
  json inputs = json::array();
  for (const ManifestInput& in : m.inputs) {
    inputs.push_back({{"path", in.path}, {"format", in.format}, {"num_docs", in.num_docs}});
  }
  json j = {
      {"format", "tandem-data"},
      {"version", kManifestVersion},
      {"tokenizer",
       {{"kind", m.tokenizer_kind},
        {"vocab_size", m.vocab_size},
        {"bos_id", m.bos_id},
        {"eos_id", m.eos_id},
        {"chat_template", m.chat_template}}},
      {"token_width", m.token_width},
      {"splits", splits},
      {"inputs", inputs},
      {"options", OptionsToJson(m.options)},
  };
  return WriteFileAtomic(path, j.dump(2, ' ', false, json::error_handler_t::replace) + "\n");
}

StatusOr<Manifest> ReadManifest(const std::string& path) {
  TANDEM_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    return DataLossError(StrCat("manifest '", path, "': invalid JSON: ", e.what()));
  }
  const std::string where = "manifest '" + path + "'";
  if (!j.is_object()) return DataLossError(where + ": expected a JSON object");
  int version = 0;
  TANDEM_RETURN_IF_ERROR(Get(j, "version", where, &version));
  if (version != kManifestVersion) {
    return UnimplementedError(
        StrCat(where, ": version ", version, ", this build reads ", kManifestVersion));
  }
  Manifest m;
  json tok;
  TANDEM_RETURN_IF_ERROR(Get(j, "tokenizer", where, &tok));
  TANDEM_RETURN_IF_ERROR(Get(tok, "kind", where + ".tokenizer", &m.tokenizer_kind));
  TANDEM_RETURN_IF_ERROR(Get(tok, "vocab_size", where + ".tokenizer", &m.vocab_size));
  TANDEM_RETURN_IF_ERROR(Get(tok, "bos_id", where + ".tokenizer", &m.bos_id));
  TANDEM_RETURN_IF_ERROR(Get(tok, "eos_id", where + ".tokenizer", &m.eos_id));
  TANDEM_RETURN_IF_ERROR(Get(tok, "chat_template", where + ".tokenizer", &m.chat_template));
  TANDEM_RETURN_IF_ERROR(Get(j, "token_width", where, &m.token_width));
  json splits;
  TANDEM_RETURN_IF_ERROR(Get(j, "splits", where, &splits));
  if (!splits.is_object()) return DataLossError(where + ".splits: expected an object");
  for (auto it = splits.begin(); it != splits.end(); ++it) {
    TANDEM_ASSIGN_OR_RETURN(m.splits[it.key()],
                            SplitFromJson(it.value(), where + ".splits." + it.key()));
  }
  return m;
}

}  // namespace tandem::trainer::internal
