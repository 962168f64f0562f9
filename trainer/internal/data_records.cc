#include "trainer/internal/data_records.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <nlohmann/json.hpp>

namespace tandem::trainer::internal {
namespace {

using nlohmann::json;

void Append(Document& doc, const std::vector<int32_t>& ids, uint8_t mask) {
  doc.tokens.insert(doc.tokens.end(), ids.begin(), ids.end());
  doc.mask.insert(doc.mask.end(), ids.size(), mask);
  if (mask == 0 && !ids.empty()) doc.needs_mask = true;
}

void AppendId(Document& doc, int32_t id, uint8_t mask) {
  doc.tokens.push_back(id);
  doc.mask.push_back(mask);
  if (mask == 0) doc.needs_mask = true;
}

bool IsSpace(char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; }

std::string_view Trim(std::string_view s) {
  while (!s.empty() && IsSpace(s.front())) s.remove_prefix(1);
  while (!s.empty() && IsSpace(s.back())) s.remove_suffix(1);
  return s;
}

bool IsBlank(std::string_view line) { return Trim(line).empty(); }

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// Calls fn(line, line_number) for each line (without '\n' or a trailing '\r').
template <typename Fn>
Status ForEachLine(std::string_view contents, Fn&& fn) {
  int64_t line_no = 0;
  size_t pos = 0;
  while (pos < contents.size()) {
    size_t end = contents.find('\n', pos);
    if (end == std::string_view::npos) end = contents.size();
    std::string_view line = contents.substr(pos, end - pos);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    ++line_no;
    TANDEM_RETURN_IF_ERROR(fn(line, line_no));
    pos = end + 1;
  }
  return Status::Ok();
}

std::string Where(const std::string& path, int64_t line) { return StrCat(path, ":", line, ": "); }

StatusOr<json> ParseObject(const std::string& path, int64_t line_no, std::string_view line) {
  json j;
  try {
    j = json::parse(line);
  } catch (const json::exception& e) {
    return InvalidArgumentError(Where(path, line_no) + "invalid JSON: " + e.what());
  }
  if (!j.is_object()) {
    return InvalidArgumentError(
        StrCat(Where(path, line_no), "expected a JSON object, found ", j.type_name()));
  }
  return j;
}

StatusOr<std::string> StringField(const json& j, const char* key, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end()) return InvalidArgumentError(StrCat(where, "missing field \"", key, "\""));
  if (!it->is_string()) {
    return InvalidArgumentError(
        StrCat(where, "field \"", key, "\" must be a string, found ", it->type_name()));
  }
  return it->get<std::string>();
}

StatusOr<std::vector<ChatMessage>> ParseMessages(const json& j, const std::string& where) {
  auto it = j.find("messages");
  if (it == j.end()) return InvalidArgumentError(where + "missing field \"messages\"");
  if (!it->is_array() || it->empty()) {
    return InvalidArgumentError(where +
                                "\"messages\" must be a non-empty array of "
                                "{\"role\", \"content\"} objects");
  }
  std::vector<ChatMessage> messages;
  for (size_t i = 0; i < it->size(); ++i) {
    const json& m = (*it)[i];
    const std::string at = StrCat(where, "messages[", i, "]: ");
    if (!m.is_object()) return InvalidArgumentError(at + "expected an object");
    ChatMessage msg;
    TANDEM_ASSIGN_OR_RETURN(msg.role, StringField(m, "role", at));
    TANDEM_ASSIGN_OR_RETURN(msg.content, StringField(m, "content", at));
    if (msg.role.empty()) return InvalidArgumentError(at + "empty \"role\"");
    messages.push_back(std::move(msg));
  }
  return messages;
}

// One JSONL record of `format` to a document.
StatusOr<Document> RenderRecord(const json& j, const std::string& format, const std::string& where,
                                const RenderContext& ctx) {
  if (format == "jsonl") {
    TANDEM_ASSIGN_OR_RETURN(std::string text, StringField(j, "text", where));
    return RenderText(ctx, text);
  }
  if (format == "sft") {
    TANDEM_ASSIGN_OR_RETURN(std::string prompt, StringField(j, "prompt", where));
    TANDEM_ASSIGN_OR_RETURN(std::string completion, StringField(j, "completion", where));
    return RenderSft(ctx, prompt, completion);
  }
  TANDEM_ASSIGN_OR_RETURN(std::vector<ChatMessage> messages, ParseMessages(j, where));
  return RenderChat(ctx, messages);
}

}  // namespace

RenderContext MakeRenderContext(const model::Tokenizer& tokenizer, bool add_bos, bool add_eos) {
  RenderContext ctx;
  ctx.tokenizer = &tokenizer;
  if (add_bos) ctx.bos = tokenizer.bos_id();
  if (add_eos) ctx.eos = tokenizer.eos_id();
  auto start = tokenizer.TokenId("<|start_header_id|>");
  auto end = tokenizer.TokenId("<|end_header_id|>");
  auto eot = tokenizer.TokenId("<|eot_id|>");
  if (start.ok() && end.ok() && eot.ok()) {
    ctx.llama3_chat = true;
    ctx.eot_id = *eot;
  }
  return ctx;
}

Document RenderText(const RenderContext& ctx, std::string_view text) {
  Document doc;
  if (ctx.bos) AppendId(doc, *ctx.bos, 1);
  Append(doc, ctx.tokenizer->Encode(text), 1);
  if (ctx.eos) AppendId(doc, *ctx.eos, 1);
  return doc;
}

Document RenderSft(const RenderContext& ctx, std::string_view prompt, std::string_view completion) {
  Document doc;
  if (ctx.bos) AppendId(doc, *ctx.bos, 0);
  Append(doc, ctx.tokenizer->Encode(prompt), 0);
  Append(doc, ctx.tokenizer->Encode(completion), 1);
  if (ctx.eos) AppendId(doc, *ctx.eos, 1);
  doc.needs_mask = true;
  return doc;
}

Document RenderChat(const RenderContext& ctx, const std::vector<ChatMessage>& messages) {
  Document doc;
  if (ctx.bos) AppendId(doc, *ctx.bos, 0);
  for (const ChatMessage& m : messages) {
    const uint8_t loss = m.role == "assistant" ? 1 : 0;
    if (ctx.llama3_chat) {
      // Llama-3: <|start_header_id|>role<|end_header_id|>\n\n content <|eot_id|>, content trimmed.
      Append(doc, ctx.tokenizer->Encode("<|start_header_id|>" + m.role + "<|end_header_id|>\n\n"),
             0);
      Append(doc, ctx.tokenizer->Encode(Trim(m.content)), loss);
      AppendId(doc, ctx.eot_id, loss);
    } else {
      Append(doc, ctx.tokenizer->Encode("<|" + m.role + "|>\n"), 0);
      Append(doc, ctx.tokenizer->Encode(m.content + "\n"), loss);
    }
  }
  if (ctx.eos) AppendId(doc, *ctx.eos, messages.back().role == "assistant" ? 1 : 0);
  doc.needs_mask = true;
  return doc;
}

std::vector<std::string_view> SplitTextDocuments(std::string_view text) {
  std::vector<std::string_view> docs;
  size_t doc_begin = 0;  // start of the current document
  size_t last_end = 0;   // end of the last non-blank line of it
  int blank_run = 0;
  auto flush = [&](size_t end) {
    std::string_view d = Trim(text.substr(doc_begin, end - doc_begin));
    if (!d.empty()) docs.push_back(d);
  };
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find_first_of("\n\f", pos);
    if (end == std::string_view::npos) end = text.size();
    const std::string_view line = text.substr(pos, end - pos);
    if (IsBlank(line)) {
      ++blank_run;
    } else {
      if (blank_run >= 2) {  // two or more blank lines before this one: a document break
        flush(last_end);
        doc_begin = pos;
      }
      blank_run = 0;
      last_end = end;
    }
    if (end < text.size() && text[end] == '\f') {
      flush(end);
      doc_begin = end + 1;
      last_end = end + 1;
      blank_run = 0;
    }
    pos = end + 1;
  }
  flush(text.size());
  return docs;
}

StatusOr<std::string> ResolveFormat(const std::string& path, std::string_view contents,
                                    const std::string& format) {
  if (format == "text" || format == "jsonl" || format == "sft" || format == "chat") return format;
  if (format != "auto") {
    return InvalidArgumentError(
        StrCat("unknown data format '", format, "' (expected text, jsonl, sft, chat or auto)"));
  }
  const std::string ext = Lower(std::filesystem::path(path).extension().string());
  if (ext == ".txt" || ext == ".text" || ext == ".md") return std::string("text");
  // The first non-blank line decides.
  std::string_view first;
  int64_t first_no = 0;
  TANDEM_RETURN_IF_ERROR(ForEachLine(contents, [&](std::string_view line, int64_t no) {
    if (first_no == 0 && !IsBlank(line)) {
      first = line;
      first_no = no;
    }
    return Status::Ok();
  }));
  const bool json_ext = ext == ".jsonl" || ext == ".json" || ext == ".ndjson";
  if (!json_ext && (first_no == 0 || Trim(first).front() != '{')) return std::string("text");
  if (first_no == 0) return std::string("jsonl");  // an empty JSONL file: no documents
  TANDEM_ASSIGN_OR_RETURN(json j, ParseObject(path, first_no, first));
  if (j.contains("messages")) return std::string("chat");
  if (j.contains("prompt") && j.contains("completion")) return std::string("sft");
  if (j.contains("text")) return std::string("jsonl");
  std::string keys;
  for (auto it = j.begin(); it != j.end(); ++it) keys += (keys.empty() ? "" : ", ") + it.key();
  return InvalidArgumentError(StrCat(Where(path, first_no),
                                     "cannot tell the format: expected a \"text\", "
                                     "\"prompt\"+\"completion\" or \"messages\" field, found {",
                                     keys, "}"));
}

Status ReadDocuments(const std::string& path, std::string_view contents, const std::string& format,
                     const RenderContext& ctx, const std::function<Status(Document&&)>& emit) {
  if (format == "text") {
    for (std::string_view d : SplitTextDocuments(contents)) {
      TANDEM_RETURN_IF_ERROR(emit(RenderText(ctx, d)));
    }
    return Status::Ok();
  }
  return ForEachLine(contents, [&](std::string_view line, int64_t no) -> Status {
    if (IsBlank(line)) return Status::Ok();
    TANDEM_ASSIGN_OR_RETURN(json j, ParseObject(path, no, line));
    TANDEM_ASSIGN_OR_RETURN(Document doc, RenderRecord(j, format, Where(path, no), ctx));
    return emit(std::move(doc));
  });
}

}  // namespace tandem::trainer::internal
