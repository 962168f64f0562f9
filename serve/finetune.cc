// JSONL training files for co-serving fine-tuning jobs (serve/finetune.h).
#include "serve/finetune.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "serve/chat_template.h"

namespace tandem::serve {
namespace {

using nlohmann::json;

std::string TokenText(const model::Tokenizer& tok, std::optional<int32_t> id) {
  if (!id) return "";
  return tok.Decode(std::span<const int32_t>(&*id, 1));
}

// prompt text, completion text of a {"messages": [...]} row.
StatusOr<std::pair<std::string, std::string>> ChatRow(const json& messages,
                                                      const model::Tokenizer& tok,
                                                      const ChatTemplate* tmpl,
                                                      const std::string& where) {
  if (tmpl == nullptr) {
    return InvalidArgumentError(StrCat(where, ": chat rows need the server's chat template"));
  }
  if (!messages.is_array() || messages.size() < 2) {
    return InvalidArgumentError(
        StrCat(where, ": 'messages' must be an array of at least 2 messages"));
  }
  std::vector<ChatMessage> all;
  for (const json& m : messages) {
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string() || !m.contains("content") ||
        !m["content"].is_string()) {
      return InvalidArgumentError(
          StrCat(where, ": every message must have string 'role' and 'content'"));
    }
    all.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
  }
  if (all.back().role != "assistant") {
    return InvalidArgumentError(
        StrCat(where, ": the last message must be the assistant's, found '", all.back().role, "'"));
  }
  const std::string bos = TokenText(tok, tok.bos_id()), eos = TokenText(tok, tok.eos_id());
  std::vector<ChatMessage> head(all.begin(), all.end() - 1);
  TANDEM_ASSIGN_OR_RETURN(std::string prefix, tmpl->Render(head, true, bos, eos));
  TANDEM_ASSIGN_OR_RETURN(std::string full, tmpl->Render(all, false, bos, eos));
  if (full.compare(0, prefix.size(), prefix) != 0) {
    return InvalidArgumentError(StrCat(where, ": the chat template's rendering of the messages ",
                                       "does not start with its generation prompt"));
  }
  return std::make_pair(prefix, full.substr(prefix.size()));
}

}  // namespace

StatusOr<std::vector<FineTuneExample>> ReadFineTuneFile(const std::string& path,
                                                        const model::Tokenizer& tok,
                                                        const ChatTemplate* chat_template,
                                                        int64_t max_tokens) {
  std::ifstream in(path);
  if (!in) return NotFoundError(StrCat("training file ", path, " cannot be opened"));
  std::vector<FineTuneExample> out;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = StrCat(path, ":", n);
    json row = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (row.is_discarded() || !row.is_object()) {
      return InvalidArgumentError(StrCat(where, ": expected a JSON object per line"));
    }
    FineTuneExample e;
    std::string prompt, completion;
    bool chat = false;
    if (row.contains("messages")) {
      TANDEM_ASSIGN_OR_RETURN(auto pc, ChatRow(row["messages"], tok, chat_template, where));
      prompt = pc.first;
      completion = pc.second;
      chat = true;
    } else {
      if (!row.contains("prompt") || !row["prompt"].is_string() || !row.contains("completion") ||
          !row["completion"].is_string()) {
        return InvalidArgumentError(
            StrCat(where, ": expected string 'prompt' and 'completion', ", "or 'messages'"));
      }
      prompt = row["prompt"].get<std::string>();
      completion = row["completion"].get<std::string>();
    }
    // Chat templates write BOS themselves when they want it.
    if (!chat && tok.bos_id()) e.tokens.push_back(*tok.bos_id());
    for (int32_t id : tok.Encode(prompt)) e.tokens.push_back(id);
    e.loss_from = std::max<int64_t>(1, static_cast<int64_t>(e.tokens.size()));
    for (int32_t id : tok.Encode(completion)) e.tokens.push_back(id);
    if (tok.eos_id()) e.tokens.push_back(*tok.eos_id());
    const int64_t len = static_cast<int64_t>(e.tokens.size());
    if (len <= e.loss_from) {
      return InvalidArgumentError(StrCat(where, ": the completion is empty"));
    }
    if (max_tokens > 0 && len > max_tokens) {
      return InvalidArgumentError(
          StrCat(where, ": the row has ", len, " tokens, more than the ", "limit of ", max_tokens));
    }
    out.push_back(std::move(e));
  }
  if (out.empty()) return InvalidArgumentError(StrCat("training file ", path, " has no rows"));
  return out;
}

}  // namespace tandem::serve
