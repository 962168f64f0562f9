// Input parsing and rendering for PrepareData: text, JSONL, SFT and chat files become tokenized
// documents with a per-token loss mask. The rules are documented in docs/formats.md.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"
#include "model/tokenizer.h"

namespace tandem::trainer::internal {

// One tokenized document. mask[i] = 1 when token i is trained on as a target.
struct Document {
  std::vector<int32_t> tokens;
  std::vector<uint8_t> mask;
  bool needs_mask = false;  // some token has mask 0 (SFT and chat documents)
};

// Which special ids to add and which tokens a chat template uses.
struct RenderContext {
  const model::Tokenizer* tokenizer = nullptr;
  std::optional<int32_t> bos;  // set when BOS is added
  std::optional<int32_t> eos;  // set when EOS is added
  bool llama3_chat = false;  // the tokenizer has <|start_header_id|>, <|end_header_id|>, <|eot_id|>
  int32_t eot_id = -1;
};

RenderContext MakeRenderContext(const model::Tokenizer& tokenizer, bool add_bos, bool add_eos);

// BOS + text + EOS, every token trained on.
Document RenderText(const RenderContext& ctx, std::string_view text);
// BOS + prompt + completion + EOS; loss on the completion and EOS only.
Document RenderSft(const RenderContext& ctx, std::string_view prompt, std::string_view completion);

struct ChatMessage {
  std::string role;
  std::string content;
};
// The chat template (Llama-3's when ctx.llama3_chat, else the plain "<|role|>\n" one) with loss
// on assistant turns only.
Document RenderChat(const RenderContext& ctx, const std::vector<ChatMessage>& messages);

// Splits a plain text file into documents: form feeds and runs of two or more blank lines
// separate documents; each is trimmed of surrounding whitespace; empty ones are dropped.
std::vector<std::string_view> SplitTextDocuments(std::string_view text);

// Resolves "auto" for one file: "text" for .txt/.text/.md; for .jsonl/.json/.ndjson (or any other
// file whose first non-blank line is a JSON object) the keys of that first record decide:
// "messages" -> chat, "prompt"+"completion" -> sft, "text" -> jsonl. Other formats pass through
// after validation.
StatusOr<std::string> ResolveFormat(const std::string& path, std::string_view contents,
                                    const std::string& format);

// Parses `contents` of `path` in `format` (resolved) and calls `emit` with each document in file
// order. Errors name path:line and the problem.
Status ReadDocuments(const std::string& path, std::string_view contents, const std::string& format,
                     const RenderContext& ctx, const std::function<Status(Document&&)>& emit);

}  // namespace tandem::trainer::internal
