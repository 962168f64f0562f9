#include "serve/chat_template.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <utility>

#include "serve/internal/jinja.h"

namespace tandem::serve {
namespace {

constexpr char kFallbackSource[] =
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}";

StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFoundError("cannot open " + path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

StatusOr<ChatTemplate> ChatTemplate::Parse(const std::string& source) {
  TANDEM_ASSIGN_OR_RETURN(internal::NodePtr root, internal::ParseTemplate(source));
  ChatTemplate t;
  t.root_ = std::move(root);
  return t;
}

const char* ChatTemplate::FallbackSource() { return kFallbackSource; }

ChatTemplate ChatTemplate::Fallback() {
  StatusOr<ChatTemplate> t = Parse(kFallbackSource);
  TANDEM_CHECK_OK(t.status());
  return std::move(*t);
}

StatusOr<std::string> ChatTemplate::Render(const std::vector<ChatMessage>& messages,
                                           bool add_generation_prompt, const std::string& bos_token,
                                           const std::string& eos_token) const {
  TANDEM_CHECK(root_ != nullptr);
  internal::ValueList list;
  for (const ChatMessage& m : messages) {
    list.push_back(internal::Value::Dict(
        {{"role", internal::Value::Str(m.role)}, {"content", internal::Value::Str(m.content)}}));
  }
  const internal::ValueDict globals = {
      {"messages", internal::Value::List(std::move(list))},
      {"add_generation_prompt", internal::Value::Bool(add_generation_prompt)},
      {"bos_token", internal::Value::Str(bos_token)},
      {"eos_token", internal::Value::Str(eos_token)},
  };
  return internal::RenderTemplate(*root_, globals);
}

StatusOr<std::string> ReadChatTemplate(const std::string& model_dir) {
  const std::string config_path = model_dir + "/tokenizer_config.json";
  StatusOr<std::string> config_text = ReadFile(config_path);
  if (config_text.ok()) {
    nlohmann::json config = nlohmann::json::parse(*config_text, nullptr, false);
    if (config.is_discarded()) return InvalidArgumentError(config_path + " is not valid JSON");
    auto it = config.find("chat_template");
    if (it != config.end() && it->is_string()) return it->get<std::string>();
    if (it != config.end() && it->is_array()) {
      for (const nlohmann::json& entry : *it) {
        if (entry.is_object() && entry.value("name", "") == "default" &&
            entry.contains("template") && entry["template"].is_string()) {
          return entry["template"].get<std::string>();
        }
      }
      return InvalidArgumentError(config_path + ": chat_template is a list without a 'default'");
    }
    if (it != config.end() && !it->is_null()) {
      return InvalidArgumentError(StrCat(config_path,
                                         ": chat_template must be a string or a list,"
                                         " found ",
                                         it->type_name()));
    }
  }
  StatusOr<std::string> jinja = ReadFile(model_dir + "/chat_template.jinja");
  if (jinja.ok()) return jinja;
  return NotFoundError(
      StrCat("no chat_template in ", config_path, " and no ", model_dir, "/chat_template.jinja"));
}

}  // namespace tandem::serve
