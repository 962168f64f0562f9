// Parsing and validation of OpenAI completion and chat requests.
#include <cmath>
#include <limits>
#include <string>
#include <utility>

#include "serve/internal/openai_protocol.h"

namespace tandem::serve::internal {
namespace {

using nlohmann::json;
using MaybeError = std::optional<ApiError>;

constexpr int kMaxLogprobs = 20;
constexpr size_t kMaxStops = 16;

std::string TypeName(const json& v) { return v.type_name(); }

MaybeError WrongType(const std::string& field, const char* expected, const json& found) {
  return BadRequest(StrCat("'", field, "' must be ", expected, ", found ", TypeName(found)), field);
}

// Reads an optional number field into *out (null or absent leaves *out as is).
MaybeError ReadNumber(const json& body, const char* field, double lo, double hi, float* out) {
  auto it = body.find(field);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_number()) return WrongType(field, "a number", *it);
  const double v = it->get<double>();
  if (!(v >= lo && v <= hi)) {
    return BadRequest(StrCat("'", field, "' must be in [", lo, ", ", hi, "], found ", v), field);
  }
  *out = static_cast<float>(v);
  return std::nullopt;
}

MaybeError ReadInt(const json& body, const char* field, int64_t lo, int64_t hi, int64_t* out,
                   bool* given = nullptr) {
  auto it = body.find(field);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_number_integer()) return WrongType(field, "an integer", *it);
  const int64_t v =
      it->is_number_unsigned() && it->get<uint64_t>() > INT64_MAX ? INT64_MAX : it->get<int64_t>();
  if (v < lo || v > hi) {
    return BadRequest(StrCat("'", field, "' must be in [", lo, ", ", hi, "], found ", v), field);
  }
  *out = v;
  if (given) *given = true;
  return std::nullopt;
}

MaybeError ReadBool(const json& body, const char* field, bool* out) {
  auto it = body.find(field);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_boolean()) return WrongType(field, "a boolean", *it);
  *out = it->get<bool>();
  return std::nullopt;
}

// Fields that would change results in ways the engine does not implement.
MaybeError RejectUnsupported(const json& body) {
  for (const char* field : {"n", "best_of"}) {
    auto it = body.find(field);
    if (it != body.end() && !it->is_null() && *it != 1) {
      return BadRequest(
          StrCat("'", field, "' must be 1 (one choice per request), found ", it->dump()), field);
    }
  }
  for (const char* field : {"presence_penalty", "frequency_penalty"}) {
    auto it = body.find(field);
    if (it != body.end() && !it->is_null() && !(it->is_number() && it->get<double>() == 0)) {
      return BadRequest(StrCat("'", field, "' is not supported (must be 0)"), field);
    }
  }
  auto bias = body.find("logit_bias");
  if (bias != body.end() && !bias->is_null() && !bias->empty()) {
    return BadRequest("'logit_bias' is not supported", "logit_bias");
  }
  auto echo = body.find("echo");
  if (echo != body.end() && !echo->is_null() && *echo != false) {
    return BadRequest("'echo' is not supported", "echo");
  }
  auto suffix = body.find("suffix");
  if (suffix != body.end() && !suffix->is_null()) {
    return BadRequest("'suffix' is not supported", "suffix");
  }
  return std::nullopt;
}

MaybeError ReadStop(const json& body, std::vector<std::string>* out) {
  auto it = body.find("stop");
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (it->is_string()) {
    if (!it->get<std::string>().empty()) out->push_back(it->get<std::string>());
    return std::nullopt;
  }
  if (!it->is_array()) return WrongType("stop", "a string or a list of strings", *it);
  if (it->size() > kMaxStops) {
    return BadRequest(
        StrCat("'stop' has ", it->size(), " strings, at most ", kMaxStops, " are allowed"), "stop");
  }
  for (const json& s : *it) {
    if (!s.is_string()) return WrongType("stop", "a list of strings", s);
    if (!s.get<std::string>().empty()) out->push_back(s.get<std::string>());
  }
  return std::nullopt;
}

MaybeError ReadSampling(const json& body, ApiRequest* r) {
  SamplingParams& s = r->sampling;
  s.temperature = 1.0f;
  if (auto e = ReadNumber(body, "temperature", 0, 2, &s.temperature)) return e;
  if (auto e = ReadNumber(body, "top_p", 0, 1, &s.top_p)) return e;
  if (s.top_p <= 0) return BadRequest("'top_p' must be in (0, 1], found 0", "top_p");
  int64_t top_k = 0;
  if (auto e = ReadInt(body, "top_k", -1, 1 << 30, &top_k)) return e;
  s.top_k = top_k < 0 ? 0 : static_cast<int>(top_k);  // -1 is vLLM's "off"
  int64_t seed = 0;
  if (auto e = ReadInt(body, "seed", INT64_MIN, INT64_MAX, &seed, &s.has_seed)) return e;
  s.seed = static_cast<uint64_t>(seed);
  if (auto e = ReadStop(body, &s.stop)) return e;
  if (auto e = ReadBool(body, "ignore_eos", &s.ignore_eos)) return e;
  int64_t max_tokens = 16;
  const char* max_field = "max_tokens";
  if (r->endpoint == Endpoint::kChat && body.contains("max_completion_tokens")) {
    max_field = "max_completion_tokens";
  }
  if (auto e = ReadInt(body, max_field, 1, INT32_MAX, &max_tokens, &r->max_tokens_given)) {
    return e;
  }
  s.max_tokens = static_cast<int>(max_tokens);
  return std::nullopt;
}

MaybeError ReadLogprobs(const json& body, ApiRequest* r) {
  if (r->endpoint == Endpoint::kCompletions) {
    int64_t n = -1;
    if (auto e = ReadInt(body, "logprobs", 0, kMaxLogprobs, &n)) return e;
    r->sampling.logprobs = static_cast<int>(n);
    r->logprobs = n >= 0;
    return std::nullopt;
  }
  if (auto e = ReadBool(body, "logprobs", &r->logprobs)) return e;
  int64_t top = 0;
  bool top_given = false;
  if (auto e = ReadInt(body, "top_logprobs", 0, kMaxLogprobs, &top, &top_given)) return e;
  if (top_given && !r->logprobs) {
    return BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs");
  }
  r->sampling.logprobs = r->logprobs ? static_cast<int>(top) : -1;
  return std::nullopt;
}

MaybeError ReadStream(const json& body, ApiRequest* r) {
  if (auto e = ReadBool(body, "stream", &r->stream)) return e;
  auto it = body.find("stream_options");
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!r->stream) return BadRequest("'stream_options' needs 'stream': true", "stream_options");
  if (!it->is_object()) return WrongType("stream_options", "an object", *it);
  if (auto e = ReadBool(*it, "include_usage", &r->include_usage)) {
    e->param = "stream_options.include_usage";
    return e;
  }
  return std::nullopt;
}

MaybeError ReadPrompt(const json& body, ApiRequest* r) {
  auto it = body.find("prompt");
  if (it == body.end() || it->is_null()) return BadRequest("'prompt' is required", "prompt");
  if (it->is_string()) {
    r->prompt_is_text = true;
    r->prompt_text = it->get<std::string>();
    if (r->prompt_text.empty()) return BadRequest("'prompt' is empty", "prompt");
    return std::nullopt;
  }
  const json* ids = &*it;
  // A list holding one prompt (["text"] or [[1, 2]]) is one prompt; more would need n > 1 choices.
  if (it->is_array() && it->size() == 1 && ((*it)[0].is_string() || (*it)[0].is_array())) {
    if ((*it)[0].is_string()) {
      r->prompt_is_text = true;
      r->prompt_text = (*it)[0].get<std::string>();
      if (r->prompt_text.empty()) return BadRequest("'prompt' is empty", "prompt");
      return std::nullopt;
    }
    ids = &(*it)[0];
  }
  if (!ids->is_array() || ids->empty()) {
    return BadRequest(
        "'prompt' must be a string or a non-empty list of token ids (one prompt "
        "per request)",
        "prompt");
  }
  r->prompt_is_text = false;
  for (const json& t : *ids) {
    if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() > INT32_MAX) {
      return BadRequest(StrCat("'prompt' token ids must be integers >= 0, found ", t.dump()),
                        "prompt");
    }
    r->prompt_tokens.push_back(static_cast<int32_t>(t.get<int64_t>()));
  }
  return std::nullopt;
}

// Content is a string or a list of parts of which only {"type": "text", "text": ...} is served.
MaybeError ReadContent(const json& content, size_t index, std::string* out) {
  const std::string field = StrCat("messages[", index, "].content");
  if (content.is_null()) return std::nullopt;
  if (content.is_string()) {
    *out = content.get<std::string>();
    return std::nullopt;
  }
  if (!content.is_array()) return WrongType(field, "a string or a list of text parts", content);
  for (const json& part : content) {
    if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
        !part["text"].is_string()) {
      return BadRequest(StrCat("'", field,
                               "' parts must be {\"type\": \"text\", \"text\": ...} "
                               "(only text is supported)"),
                        field);
    }
    *out += part["text"].get<std::string>();
  }
  return std::nullopt;
}

MaybeError ReadMessages(const json& body, ApiRequest* r) {
  auto it = body.find("messages");
  if (it == body.end() || !it->is_array() || it->empty()) {
    return BadRequest("'messages' must be a non-empty list of {\"role\", \"content\"}", "messages");
  }
  for (size_t i = 0; i < it->size(); ++i) {
    const json& m = (*it)[i];
    const std::string field = StrCat("messages[", i, "]");
    if (!m.is_object()) return WrongType(field, "an object", m);
    auto role = m.find("role");
    if (role == m.end() || !role->is_string()) {
      return BadRequest(StrCat("'", field, ".role' must be a string"), field + ".role");
    }
    ChatMessage msg{role->get<std::string>(), ""};
    if (msg.role != "system" && msg.role != "user" && msg.role != "assistant" &&
        msg.role != "tool" && msg.role != "developer") {
      return BadRequest(StrCat("'", field,
                               ".role' must be system, user, assistant, tool or "
                               "developer, found '",
                               msg.role, "'"),
                        field + ".role");
    }
    auto content = m.find("content");
    if (content != m.end()) {
      if (auto e = ReadContent(*content, i, &msg.content)) return e;
    }
    r->messages.push_back(std::move(msg));
  }
  if (auto e = ReadBool(body, "add_generation_prompt", &r->add_generation_prompt)) return e;
  return std::nullopt;
}

}  // namespace

std::optional<ApiError> ParseApiRequest(ApiRequest* out, Endpoint endpoint,
                                        const std::string& body) {
  *out = ApiRequest{};
  out->endpoint = endpoint;
  json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return BadRequest("the request body is not valid JSON");
  if (!j.is_object())
    return BadRequest(StrCat("the request body must be a JSON object, found ", TypeName(j)));
  auto model = j.find("model");
  if (model == j.end() || !model->is_string() || model->get<std::string>().empty()) {
    return BadRequest("'model' must name the base model or an adapter (see GET /v1/models)",
                      "model");
  }
  out->model = model->get<std::string>();
  if (auto e = RejectUnsupported(j)) return e;
  if (auto e = ReadSampling(j, out)) return e;
  if (auto e = ReadLogprobs(j, out)) return e;
  if (auto e = ReadStream(j, out)) return e;
  if (endpoint == Endpoint::kCompletions) return ReadPrompt(j, out);
  return ReadMessages(j, out);
}

std::optional<ApiError> CheckLengths(ApiRequest* r, int64_t prompt_len,
                                     const RequestLimits& limits) {
  if (prompt_len == 0) return BadRequest("the prompt has no tokens", "prompt");
  const char* prompt_field = r->endpoint == Endpoint::kChat ? "messages" : "prompt";
  if (limits.max_prompt_tokens > 0 && prompt_len > limits.max_prompt_tokens) {
    return BadRequest(StrCat("the prompt has ", prompt_len, " tokens, more than the limit of ",
                             limits.max_prompt_tokens),
                      prompt_field);
  }
  if (limits.max_model_len > 0 && prompt_len >= limits.max_model_len) {
    return BadRequest(StrCat("the prompt has ", prompt_len, " tokens; the model's context is ",
                             limits.max_model_len, " tokens"),
                      prompt_field);
  }
  int64_t max_tokens = r->sampling.max_tokens;
  if (!r->max_tokens_given && r->endpoint == Endpoint::kChat) {
    max_tokens = limits.max_model_len > 0 ? limits.max_model_len - prompt_len : 4096;
    if (limits.max_tokens > 0) max_tokens = std::min(max_tokens, limits.max_tokens);
  }
  const char* field = "max_tokens";
  if (limits.max_tokens > 0 && max_tokens > limits.max_tokens) {
    return BadRequest(StrCat("'max_tokens' is ", max_tokens, ", more than the server's limit of ",
                             limits.max_tokens),
                      field);
  }
  if (limits.max_model_len > 0 && prompt_len + max_tokens > limits.max_model_len) {
    return BadRequest(
        StrCat("prompt (", prompt_len, " tokens) + max_tokens (", max_tokens,
               ") is more than the model's context of ", limits.max_model_len, " tokens"),
        field);
  }
  r->sampling.max_tokens = static_cast<int>(max_tokens);
  return std::nullopt;
}

}  // namespace tandem::serve::internal
