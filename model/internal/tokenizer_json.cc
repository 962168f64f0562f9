#include "model/internal/tokenizer_json.h"

#include <algorithm>
#include <cctype>
#include <nlohmann/json.hpp>
#include <unordered_map>

namespace tandem::model::internal {
namespace {

using nlohmann::json;

constexpr int64_t kMaxVocabId = int64_t{1} << 26;

// Error reporting for one file: "<file>: <json path>: <message>".
class Reader {
 public:
  explicit Reader(const std::string& file) : file_(file) {}

  Status Error(const std::string& path, const std::string& message) const {
    return InvalidArgumentError(StrCat(file_, ": ", path, ": ", message));
  }

  // The member `key` of object `obj` (at `path`), or nullptr when absent.
  static const json* Find(const json& obj, const char* key) {
    auto it = obj.find(key);
    return it == obj.end() ? nullptr : &*it;
  }

  StatusOr<bool> Bool(const json& obj, const std::string& path, const char* key,
                      bool default_value) const {
    const json* v = Find(obj, key);
    if (v == nullptr || v->is_null()) return default_value;
    if (!v->is_boolean())
      return Error(Join(path, key), StrCat("expected a boolean, found ", Show(*v)));
    return v->get<bool>();
  }

  // An optional string: nullopt when absent or null.
  StatusOr<std::optional<std::string>> String(const json& obj, const std::string& path,
                                              const char* key) const {
    const json* v = Find(obj, key);
    if (v == nullptr || v->is_null()) return std::optional<std::string>();
    if (!v->is_string())
      return Error(Join(path, key), StrCat("expected a string, found ", Show(*v)));
    return std::optional<std::string>(v->get<std::string>());
  }

  static std::string Join(const std::string& path, const std::string& key) {
    return path.empty() ? key : path + "." + key;
  }
  static std::string Index(const std::string& path, size_t i) { return StrCat(path, "[", i, "]"); }

  // A short rendering of a JSON value for messages.
  static std::string Show(const json& v) {
    std::string s = v.dump();
    if (s.size() > 80) s = s.substr(0, 77) + "...";
    return StrCat(v.type_name(), " ", s);
  }

  // The "type" string of a component object at `path`.
  StatusOr<std::string> Type(const json& obj, const std::string& path) const {
    if (!obj.is_object()) return Error(path, StrCat("expected an object, found ", Show(obj)));
    TANDEM_ASSIGN_OR_RETURN(std::optional<std::string> type, String(obj, path, "type"));
    if (!type) return Error(Join(path, "type"), "missing");
    return *type;
  }

 private:
  const std::string& file_;
};

StatusOr<json> ParseJson(std::string_view text, const std::string& file) {
  try {
    return json::parse(text.begin(), text.end());
  } catch (const json::parse_error& e) {
    return InvalidArgumentError(StrCat(file, ": malformed JSON: ", e.what()));
  }
}

Status ParseVocab(const Reader& r, const json& model, BpeTokenizerSpec* spec) {
  const json* vocab = Reader::Find(model, "vocab");
  if (vocab == nullptr || !vocab->is_object()) {
    return r.Error("model.vocab", StrCat("expected an object of token -> id, found ",
                                         vocab ? Reader::Show(*vocab) : "nothing"));
  }
  spec->vocab.reserve(vocab->size());
  for (const auto& [token, id] : vocab->items()) {
    // The cap keeps a corrupt id from sizing the id -> token table beyond any real vocabulary.
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= kMaxVocabId) {
      return r.Error(StrCat("model.vocab[", json(token).dump(), "]"),
                     StrCat("expected an id in [0, ", kMaxVocabId, "), found ", Reader::Show(id)));
    }
    spec->vocab.emplace(token, static_cast<int32_t>(id.get<int64_t>()));
  }
  return Status::Ok();
}

// One merge: "a b" (older files) or ["a", "b"].
StatusOr<std::pair<std::string, std::string>> MergeParts(const Reader& r, const json& m,
                                                         const std::string& path) {
  if (m.is_string()) {
    const std::string s = m.get<std::string>();
    const size_t sp = s.find(' ');
    if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) {
      return r.Error(path, StrCat("expected \"left right\" (one space), found ", Reader::Show(m)));
    }
    return std::make_pair(s.substr(0, sp), s.substr(sp + 1));
  }
  if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
    return std::make_pair(m[0].get<std::string>(), m[1].get<std::string>());
  }
  return r.Error(path, StrCat("expected \"left right\" or [left, right], found ", Reader::Show(m)));
}

Status ParseMerges(const Reader& r, const json& model, BpeTokenizerSpec* spec) {
  const json* merges = Reader::Find(model, "merges");
  if (merges == nullptr || !merges->is_array()) {
    return r.Error("model.merges",
                   StrCat("expected an array, found ", merges ? Reader::Show(*merges) : "nothing"));
  }
  for (size_t i = 0; i < merges->size(); ++i) {
    const json& m = (*merges)[i];
    if (m.is_string() && m.get<std::string>().rfind("#version", 0) == 0) continue;  // as tokenizers
    const std::string path = Reader::Index("model.merges", i);
    TANDEM_ASSIGN_OR_RETURN(auto parts, MergeParts(r, m, path));
    int32_t ids[3];
    const std::string names[3] = {parts.first, parts.second, parts.first + parts.second};
    for (int k = 0; k < 3; ++k) {
      auto it = spec->vocab.find(names[k]);
      if (it == spec->vocab.end()) {
        return r.Error(path, StrCat("token ", json(names[k]).dump(), " is not in model.vocab"));
      }
      ids[k] = it->second;
    }
    spec->merges.emplace_back(ids[0], ids[1]);
    spec->merge_results.push_back(ids[2]);
  }
  return Status::Ok();
}

Status ParseModelOptions(const Reader& r, const json& model, BpeTokenizerSpec* spec) {
  if (const json* d = Reader::Find(model, "dropout");
      d != nullptr && !d->is_null() && !(d->is_number() && d->get<double>() == 0.0)) {
    return r.Error("model.dropout",
                   StrCat("BPE dropout is not supported, found ", Reader::Show(*d)));
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    TANDEM_ASSIGN_OR_RETURN(std::optional<std::string> v, r.String(model, "model", key));
    if (v && !v->empty()) {
      return r.Error(Reader::Join("model", key),
                     StrCat("not supported (byte-level BPE has none), found \"", *v, "\""));
    }
  }
  TANDEM_ASSIGN_OR_RETURN(spec->options.ignore_merges,
                          r.Bool(model, "model", "ignore_merges", false));
  TANDEM_ASSIGN_OR_RETURN(spec->options.fuse_unk, r.Bool(model, "model", "fuse_unk", false));
  TANDEM_ASSIGN_OR_RETURN(spec->options.byte_fallback,
                          r.Bool(model, "model", "byte_fallback", false));
  TANDEM_ASSIGN_OR_RETURN(std::optional<std::string> unk, r.String(model, "model", "unk_token"));
  if (unk) {
    auto it = spec->vocab.find(*unk);
    if (it == spec->vocab.end()) {
      return r.Error("model.unk_token", StrCat("\"", *unk, "\" is not in model.vocab"));
    }
    spec->options.unk_id = it->second;
  }
  return Status::Ok();
}

Status ParseModel(const Reader& r, const json& root, BpeTokenizerSpec* spec) {
  const json* model = Reader::Find(root, "model");
  if (model == nullptr || model->is_null()) {
    return r.Error("model", "missing (expected an object with \"type\": \"BPE\")");
  }
  if (!model->is_object()) {
    return r.Error("model", StrCat("expected an object, found ", Reader::Show(*model)));
  }
  TANDEM_ASSIGN_OR_RETURN(std::optional<std::string> type, r.String(*model, "model", "type"));
  if (type && *type != "BPE") {
    return r.Error("model.type", StrCat("expected \"BPE\", found \"", *type,
                                        "\" (only byte-level BPE models are supported)"));
  }
  TANDEM_RETURN_IF_ERROR(ParseVocab(r, *model, spec));
  TANDEM_RETURN_IF_ERROR(ParseMerges(r, *model, spec));
  return ParseModelOptions(r, *model, spec);
}

// Gives the added tokens the ids tokenizers gives them when it loads a file (the "id" written in
// the file is not used): in file order, a token whose content is already known keeps that id
// (model vocabulary or an earlier added token; a repeated content is dropped), any other takes
// the next id past both the vocabulary's size and the largest id handed out so far.
void AssignAddedTokenIds(BpeTokenizerSpec* spec) {
  const int64_t vocab_len = static_cast<int64_t>(spec->vocab.size());
  std::unordered_map<std::string, int32_t> assigned;
  int64_t max_assigned = -1;
  std::vector<AddedToken> kept;
  for (AddedToken& t : spec->added_tokens) {
    if (assigned.count(t.content)) continue;
    if (auto it = spec->vocab.find(t.content); it != spec->vocab.end()) {
      t.id = it->second;
    } else if (max_assigned < 0) {
      t.id = static_cast<int32_t>(vocab_len);
    } else {
      t.id = static_cast<int32_t>(max_assigned >= vocab_len || vocab_len == 0 ? max_assigned + 1
                                                                              : vocab_len);
    }
    assigned.emplace(t.content, t.id);
    max_assigned = std::max<int64_t>(max_assigned, t.id);
    kept.push_back(std::move(t));
  }
  spec->added_tokens = std::move(kept);
}

Status ParseAddedTokens(const Reader& r, const json& root, BpeTokenizerSpec* spec) {
  const json* added = Reader::Find(root, "added_tokens");
  if (added == nullptr || added->is_null()) return Status::Ok();
  if (!added->is_array()) {
    return r.Error("added_tokens", StrCat("expected an array, found ", Reader::Show(*added)));
  }
  for (size_t i = 0; i < added->size(); ++i) {
    const json& t = (*added)[i];
    const std::string path = Reader::Index("added_tokens", i);
    if (!t.is_object()) return r.Error(path, StrCat("expected an object, found ", Reader::Show(t)));
    const json* id = Reader::Find(t, "id");
    if (id == nullptr || !id->is_number_integer() || id->get<int64_t>() < 0 ||
        id->get<int64_t>() > INT32_MAX) {
      return r.Error(Reader::Join(path, "id"), StrCat("expected a non-negative 32-bit id, found ",
                                                      id ? Reader::Show(*id) : "nothing"));
    }
    AddedToken tok;
    tok.id = static_cast<int32_t>(id->get<int64_t>());
    TANDEM_ASSIGN_OR_RETURN(std::optional<std::string> content, r.String(t, path, "content"));
    if (!content || content->empty()) {
      return r.Error(Reader::Join(path, "content"), "expected a non-empty string");
    }
    tok.content = *content;
    TANDEM_ASSIGN_OR_RETURN(tok.special, r.Bool(t, path, "special", false));
    TANDEM_ASSIGN_OR_RETURN(tok.single_word, r.Bool(t, path, "single_word", false));
    TANDEM_ASSIGN_OR_RETURN(tok.lstrip, r.Bool(t, path, "lstrip", false));
    TANDEM_ASSIGN_OR_RETURN(tok.rstrip, r.Bool(t, path, "rstrip", false));
    TANDEM_ASSIGN_OR_RETURN(tok.normalized, r.Bool(t, path, "normalized", !tok.special));
    spec->added_tokens.push_back(std::move(tok));
  }
  AssignAddedTokenIds(spec);
  return Status::Ok();
}

StatusOr<SplitBehavior> ParseBehavior(const Reader& r, const json& step, const std::string& path) {
  TANDEM_ASSIGN_OR_RETURN(std::optional<std::string> b, r.String(step, path, "behavior"));
  std::string lower = b.value_or("Isolated");
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (lower == "removed") return SplitBehavior::kRemoved;
  if (lower == "isolated") return SplitBehavior::kIsolated;
  if (lower == "mergedwithprevious" || lower == "merged_with_previous")
    return SplitBehavior::kMergedWithPrevious;
  if (lower == "mergedwithnext" || lower == "merged_with_next")
    return SplitBehavior::kMergedWithNext;
  if (lower == "contiguous") return SplitBehavior::kContiguous;
  return r.Error(Reader::Join(path, "behavior"),
                 StrCat("expected Removed, Isolated, MergedWithPrevious, MergedWithNext or "
                        "Contiguous, found \"",
                        *b, "\""));
}

StatusOr<PreTokenizerStep> ParseSplit(const Reader& r, const json& step, const std::string& path) {
  PreTokenizerStep out;
  out.kind = PreTokenizerStep::Kind::kSplit;
  const std::string ppath = Reader::Join(path, "pattern");
  const json* pattern = Reader::Find(step, "pattern");
  if (pattern == nullptr || !pattern->is_object()) {
    return r.Error(ppath, StrCat("expected {\"Regex\": ...} or {\"String\": ...}, found ",
                                 pattern ? Reader::Show(*pattern) : "nothing"));
  }
  TANDEM_ASSIGN_OR_RETURN(std::optional<std::string> regex, r.String(*pattern, ppath, "Regex"));
  TANDEM_ASSIGN_OR_RETURN(std::optional<std::string> literal, r.String(*pattern, ppath, "String"));
  if (regex) {
    out.regex = RecognizeSplitRegex(*regex);
    if (!out.regex) {
      return r.Error(Reader::Join(ppath, "Regex"),
                     StrCat("unsupported regex ", json(*regex).dump(),
                            "; supported are exactly the GPT-2 pattern ", json(kGpt2Pattern).dump(),
                            " and the Llama-3 pattern ", json(kLlama3Pattern).dump()));
    }
  } else if (literal && !literal->empty()) {
    out.literal = *literal;
  } else {
    return r.Error(
        ppath, StrCat("expected a Regex or a non-empty String, found ", Reader::Show(*pattern)));
  }
  TANDEM_ASSIGN_OR_RETURN(out.behavior, ParseBehavior(r, step, path));
  TANDEM_ASSIGN_OR_RETURN(out.invert, r.Bool(step, path, "invert", false));
  return out;
}

Status ParsePreTokenizer(const Reader& r, const json& step, const std::string& path,
                         std::vector<PreTokenizerStep>* out) {
  TANDEM_ASSIGN_OR_RETURN(std::string type, r.Type(step, path));
  if (type == "Sequence") {
    const json* list = Reader::Find(step, "pretokenizers");
    const std::string lpath = Reader::Join(path, "pretokenizers");
    if (list == nullptr || !list->is_array()) return r.Error(lpath, "expected an array");
    for (size_t i = 0; i < list->size(); ++i) {
      TANDEM_RETURN_IF_ERROR(ParsePreTokenizer(r, (*list)[i], Reader::Index(lpath, i), out));
    }
    return Status::Ok();
  }
  if (type == "Split") {
    TANDEM_ASSIGN_OR_RETURN(PreTokenizerStep s, ParseSplit(r, step, path));
    out->push_back(std::move(s));
    return Status::Ok();
  }
  if (type == "ByteLevel") {
    PreTokenizerStep s;
    TANDEM_ASSIGN_OR_RETURN(s.add_prefix_space, r.Bool(step, path, "add_prefix_space", true));
    TANDEM_ASSIGN_OR_RETURN(s.use_regex, r.Bool(step, path, "use_regex", true));
    out->push_back(s);
    return Status::Ok();
  }
  return r.Error(Reader::Join(path, "type"), StrCat("unsupported pre-tokenizer \"", type,
                                                    "\" (supported: ByteLevel, Split, Sequence)"));
}

Status CheckNormalizerAndDecoder(const Reader& r, const json& root) {
  if (const json* n = Reader::Find(root, "normalizer"); n != nullptr && !n->is_null()) {
    TANDEM_ASSIGN_OR_RETURN(std::string type, r.Type(*n, "normalizer"));
    const json* list = Reader::Find(*n, "normalizers");
    const bool empty_sequence =
        type == "Sequence" && list != nullptr && list->is_array() && list->empty();
    if (!empty_sequence) {
      return r.Error("normalizer.type",
                     StrCat("unsupported normalizer \"", type, "\" (only null is supported)"));
    }
  }
  const json* d = Reader::Find(root, "decoder");
  if (d == nullptr || d->is_null()) {
    return r.Error("decoder", "missing (expected {\"type\": \"ByteLevel\"})");
  }
  TANDEM_ASSIGN_OR_RETURN(std::string type, r.Type(*d, "decoder"));
  if (type != "ByteLevel") {
    return r.Error("decoder.type", StrCat("expected \"ByteLevel\", found \"", type, "\""));
  }
  return Status::Ok();
}

}  // namespace

StatusOr<BpeTokenizerSpec> ParseTokenizerJson(std::string_view json_text, const std::string& file) {
  TANDEM_ASSIGN_OR_RETURN(json root, ParseJson(json_text, file));
  Reader r(file);
  if (!root.is_object())
    return r.Error("(root)", StrCat("expected an object, found ", Reader::Show(root)));
  BpeTokenizerSpec spec;
  TANDEM_RETURN_IF_ERROR(ParseModel(r, root, &spec));
  TANDEM_RETURN_IF_ERROR(ParseAddedTokens(r, root, &spec));
  TANDEM_RETURN_IF_ERROR(CheckNormalizerAndDecoder(r, root));
  const json* pre = Reader::Find(root, "pre_tokenizer");
  if (pre != nullptr && !pre->is_null()) {
    TANDEM_RETURN_IF_ERROR(ParsePreTokenizer(r, *pre, "pre_tokenizer", &spec.pre_tokenizer));
  }
  bool has_byte_level = false;
  for (const PreTokenizerStep& s : spec.pre_tokenizer) {
    has_byte_level = has_byte_level || s.kind == PreTokenizerStep::Kind::kByteLevel;
  }
  if (!has_byte_level) {
    return r.Error("pre_tokenizer",
                   "expected a ByteLevel step (alone or last in a Sequence): only "
                   "byte-level BPE is supported");
  }
  return spec;
}

StatusOr<SpecialTokenNames> ParseTokenizerConfigJson(std::string_view json_text,
                                                     const std::string& file) {
  TANDEM_ASSIGN_OR_RETURN(json root, ParseJson(json_text, file));
  Reader r(file);
  if (!root.is_object())
    return r.Error("(root)", StrCat("expected an object, found ", Reader::Show(root)));
  SpecialTokenNames names;
  for (const char* key : {"bos_token", "eos_token"}) {
    std::optional<std::string>& dst = key[0] == 'b' ? names.bos : names.eos;
    const json* v = Reader::Find(root, key);
    if (v == nullptr) continue;
    if (v->is_null()) {
      dst = "";
    } else if (v->is_string()) {
      dst = v->get<std::string>();
    } else if (v->is_object() && v->contains("content") && (*v)["content"].is_string()) {
      dst = (*v)["content"].get<std::string>();
    } else {
      return r.Error(
          key, StrCat("expected a string, null or {\"content\": ...}, found ", Reader::Show(*v)));
    }
  }
  return names;
}

}  // namespace tandem::model::internal
