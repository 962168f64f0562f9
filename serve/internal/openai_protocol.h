// The OpenAI wire format of `tandem serve`: parsing /v1/completions and /v1/chat/completions
// bodies into engine requests, and writing responses, SSE chunks and error objects.
//
// Pure functions over strings and JSON; no I/O, no engine calls. Parsing is strict about types
// (a string where a number belongs is a 400 naming the field) and rejects features that would
// silently change results (n > 1, best_of > 1, echo, suffix, penalties, logit_bias).
// Thread-safety: stateless.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/status.h"
#include "serve/chat_template.h"
#include "serve/engine.h"

namespace tandem::serve::internal {

// An OpenAI error object with its HTTP status: {"error": {"message", "type", "param", "code"}}.
struct ApiError {
  int http_status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;  // "" is written as null
  std::string code;   // "" is written as null
};

std::string ErrorJson(const ApiError& error);
ApiError BadRequest(std::string message, std::string param = "");
// Maps an engine Status to an API error: NotFound -> 404, InvalidArgument/OutOfRange/
// FailedPrecondition -> 400, Unavailable/ResourceExhausted -> 503, anything else -> 500.
ApiError ErrorFromStatus(const Status& status, std::string param = "");

enum class Endpoint { kCompletions, kChat };

struct ApiRequest {
  Endpoint endpoint = Endpoint::kCompletions;
  std::string model;
  // /v1/completions: a string prompt (tokenized by the server, BOS prepended) or token ids.
  bool prompt_is_text = true;
  std::string prompt_text;
  std::vector<int32_t> prompt_tokens;
  // /v1/chat/completions.
  std::vector<ChatMessage> messages;
  bool add_generation_prompt = true;  // vLLM extension
  SamplingParams sampling;
  bool max_tokens_given = false;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool logprobs = false;       // completions: logprobs >= 0; chat: logprobs == true
};

// Parses a request body. Returns the error to send, or nullopt with `out` filled.
std::optional<ApiError> ParseApiRequest(ApiRequest* out, Endpoint endpoint,
                                        const std::string& body);

struct RequestLimits {
  int64_t max_prompt_tokens = 0;  // 0: no limit beyond max_model_len
  int64_t max_tokens = 0;         // largest max_tokens accepted; 0: no limit beyond the model
  int64_t max_model_len = 0;      // prompt + completion; 0: unknown
};

// Checks the prompt length and max_tokens against the limits once the prompt is tokenized, and
// gives chat requests without max_tokens the room left in the context (capped by the limit).
std::optional<ApiError> CheckLengths(ApiRequest* request, int64_t prompt_len,
                                     const RequestLimits& limits);

// One generated token with its logprobs, already decoded to text.
struct TokenLogprobInfo {
  std::string token;
  float logprob = 0;
  std::vector<std::pair<std::string, float>> top;  // (token text, logprob)
  int64_t text_offset = 0;  // completions: offset of the token's text in the completion
};

// What every response and chunk of one request shares.
struct ResponseMeta {
  Endpoint endpoint = Endpoint::kCompletions;
  std::string id;  // "cmpl-..." or "chatcmpl-..."
  int64_t created = 0;
  std::string model;
  bool logprobs = false;
  bool include_usage = false;
};

// `data: {...}\n\n` for a chunk adding `text` (and its tokens' logprobs); `finish_reason` empty
// while not finished. Chat's first chunk (role) is RoleChunk.
std::string StreamChunk(const ResponseMeta& meta, const std::string& text,
                        const std::vector<TokenLogprobInfo>& logprobs,
                        const std::string& finish_reason);
std::string RoleChunk(const ResponseMeta& meta);
std::string UsageChunk(const ResponseMeta& meta, int64_t prompt_tokens, int64_t completion_tokens);
std::string ErrorChunk(const ApiError& error);
inline constexpr char kDoneChunk[] = "data: [DONE]\n\n";

// The whole (non-streaming) response body.
std::string FullResponse(const ResponseMeta& meta, const std::string& text,
                         const std::vector<TokenLogprobInfo>& logprobs,
                         const std::string& finish_reason, int64_t prompt_tokens,
                         int64_t completion_tokens);

// Serializes JSON, replacing invalid UTF-8 (a logprob token may be part of a character).
std::string DumpJson(const nlohmann::json& j);
std::string DumpJson(const nlohmann::ordered_json& j);

}  // namespace tandem::serve::internal
