// OpenAI response objects, SSE chunks and error objects.
#include <string>
#include <utility>

#include "serve/internal/openai_protocol.h"

namespace tandem::serve::internal {
namespace {

using json = nlohmann::ordered_json;  // fields in OpenAI's order

json NullOr(const std::string& s) { return s.empty() ? json(nullptr) : json(s); }

json Bytes(const std::string& s) {
  json out = json::array();
  for (unsigned char c : s) out.push_back(static_cast<int>(c));
  return out;
}

// Completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"} (legacy format).
json CompletionLogprobs(const std::vector<TokenLogprobInfo>& infos) {
  json tokens = json::array(), lps = json::array(), tops = json::array(), offs = json::array();
  for (const TokenLogprobInfo& t : infos) {
    tokens.push_back(t.token);
    lps.push_back(t.logprob);
    json top = json::object();
    for (const auto& [text, lp] : t.top) top[text] = lp;
    tops.push_back(std::move(top));
    offs.push_back(t.text_offset);
  }
  return {
      {"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offs}};
}

// Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}.
json ChatLogprobs(const std::vector<TokenLogprobInfo>& infos) {
  json content = json::array();
  for (const TokenLogprobInfo& t : infos) {
    json top = json::array();
    for (const auto& [text, lp] : t.top) {
      top.push_back({{"token", text}, {"logprob", lp}, {"bytes", Bytes(text)}});
    }
    content.push_back({{"token", t.token},
                       {"logprob", t.logprob},
                       {"bytes", Bytes(t.token)},
                       {"top_logprobs", top}});
  }
  return {{"content", content}};
}

json LogprobsJson(const ResponseMeta& meta, const std::vector<TokenLogprobInfo>& infos) {
  if (!meta.logprobs) return nullptr;
  return meta.endpoint == Endpoint::kChat ? ChatLogprobs(infos) : CompletionLogprobs(infos);
}

json Head(const ResponseMeta& meta, bool chunk) {
  const char* object = meta.endpoint == Endpoint::kChat
                           ? (chunk ? "chat.completion.chunk" : "chat.completion")
                           : "text_completion";
  return {{"id", meta.id}, {"object", object}, {"created", meta.created}, {"model", meta.model}};
}

json Usage(int64_t prompt_tokens, int64_t completion_tokens) {
  return {{"prompt_tokens", prompt_tokens},
          {"completion_tokens", completion_tokens},
          {"total_tokens", prompt_tokens + completion_tokens}};
}

std::string Sse(const json& j) { return "data: " + DumpJson(j) + "\n\n"; }

}  // namespace

std::string DumpJson(const nlohmann::json& j) {
  return j.dump(-1, ' ', /*ensure_ascii=*/false, nlohmann::json::error_handler_t::replace);
}

std::string DumpJson(const nlohmann::ordered_json& j) {
  return j.dump(-1, ' ', /*ensure_ascii=*/false, json::error_handler_t::replace);
}

std::string ErrorJson(const ApiError& e) {
  json body = {{"error",
                {{"message", e.message},
                 {"type", e.type},
                 {"param", NullOr(e.param)},
                 {"code", NullOr(e.code)}}}};
  return DumpJson(body);
}

ApiError BadRequest(std::string message, std::string param) {
  return ApiError{400, std::move(message), "invalid_request_error", std::move(param), ""};
}

ApiError ErrorFromStatus(const Status& status, std::string param) {
  ApiError e{500, status.message(), "internal_error", std::move(param), ""};
  switch (status.code()) {
    case StatusCode::kNotFound:
      e.http_status = 404;
      e.type = "invalid_request_error";
      e.code = "model_not_found";
      break;
    case StatusCode::kInvalidArgument:
    case StatusCode::kOutOfRange:
    case StatusCode::kFailedPrecondition:
      e.http_status = 400;
      e.type = "invalid_request_error";
      break;
    case StatusCode::kUnavailable:
    case StatusCode::kResourceExhausted:
      e.http_status = 503;
      e.type = "server_overloaded";
      e.code = "overloaded";
      break;
    default:
      break;
  }
  return e;
}

std::string StreamChunk(const ResponseMeta& meta, const std::string& text,
                        const std::vector<TokenLogprobInfo>& logprobs,
                        const std::string& finish_reason) {
  json chunk = Head(meta, /*chunk=*/true);
  json choice = {{"index", 0}};
  if (meta.endpoint == Endpoint::kChat) {
    choice["delta"] =
        finish_reason.empty() || !text.empty() ? json{{"content", text}} : json::object();
  } else {
    choice["text"] = text;
  }
  choice["logprobs"] = LogprobsJson(meta, logprobs);
  choice["finish_reason"] = NullOr(finish_reason);
  chunk["choices"] = json::array({choice});
  if (meta.include_usage) chunk["usage"] = nullptr;
  return Sse(chunk);
}

std::string RoleChunk(const ResponseMeta& meta) {
  json chunk = Head(meta, /*chunk=*/true);
  chunk["choices"] = json::array({{{"index", 0},
                                   {"delta", {{"role", "assistant"}, {"content", ""}}},
                                   {"logprobs", nullptr},
                                   {"finish_reason", nullptr}}});
  if (meta.include_usage) chunk["usage"] = nullptr;
  return Sse(chunk);
}

std::string UsageChunk(const ResponseMeta& meta, int64_t prompt_tokens, int64_t completion_tokens) {
  json chunk = Head(meta, /*chunk=*/true);
  chunk["choices"] = json::array();
  chunk["usage"] = Usage(prompt_tokens, completion_tokens);
  return Sse(chunk);
}

std::string ErrorChunk(const ApiError& error) { return "data: " + ErrorJson(error) + "\n\n"; }

std::string FullResponse(const ResponseMeta& meta, const std::string& text,
                         const std::vector<TokenLogprobInfo>& logprobs,
                         const std::string& finish_reason, int64_t prompt_tokens,
                         int64_t completion_tokens) {
  json body = Head(meta, /*chunk=*/false);
  json choice = {{"index", 0}};
  if (meta.endpoint == Endpoint::kChat) {
    choice["message"] = {{"role", "assistant"}, {"content", text}};
  } else {
    choice["text"] = text;
  }
  choice["logprobs"] = LogprobsJson(meta, logprobs);
  choice["finish_reason"] = finish_reason;
  body["choices"] = json::array({choice});
  body["usage"] = Usage(prompt_tokens, completion_tokens);
  return DumpJson(body);
}

}  // namespace tandem::serve::internal
