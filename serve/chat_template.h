// ChatTemplate: turns chat messages into a prompt string with the model's own Jinja chat
// template (the `chat_template` of `tokenizer_config.json`), as `transformers`'
// apply_chat_template does.
//
// It implements the subset of Jinja2 that Llama-2/3, ChatML, Zephyr and Mistral templates use:
// text, {{ expr }}, {% if/elif/else/endif %}, {% for x in list %} with loop.index, index0, first,
// last, length; {% set name = expr %}; {# comments #}; whitespace control ({%- -%}) and the
// trim_blocks/lstrip_blocks mode HF renders with; string/int/bool/none literals, list literals,
// variables, x.attr, x['key'], x[i], x[a:b], + - * / % ~, == != < > <= >=, and/or/not, in,
// `is [not] defined/none/string`, conditional expressions `a if c else b`, filters trim, length,
// upper, lower, string, and methods strip/lstrip/rstrip/upper/lower/startswith/endswith;
// raise_exception(msg). Anything else is an InvalidArgument at Parse time naming the position.
//
//   TANDEM_ASSIGN_OR_RETURN(ChatTemplate t, ChatTemplate::Parse(source));
//   TANDEM_ASSIGN_OR_RETURN(std::string prompt, t.Render(messages, true, "<s>", "</s>"));
//
// Thread-safety: a parsed template is immutable; Render may run on many threads at once.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/status.h"

namespace tandem::serve {

struct ChatMessage {
  std::string role;  // "system", "user", "assistant", "tool"
  std::string content;
};

namespace internal {
struct TemplateNode;
}

class ChatTemplate {
 public:
  static StatusOr<ChatTemplate> Parse(const std::string& source);
  // The template used when the model has none: "<bos>role: content\n" per message, then
  // "assistant: " when a generation prompt is asked for.
  static ChatTemplate Fallback();
  static const char* FallbackSource();

  // Renders with `messages`, `add_generation_prompt`, `bos_token` and `eos_token` defined.
  // Errors: raise_exception(...) from the template, type errors (naming the position).
  StatusOr<std::string> Render(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                               const std::string& bos_token, const std::string& eos_token) const;

 private:
  std::shared_ptr<const internal::TemplateNode> root_;
};

// The chat template of a model directory: `chat_template` in DIR/tokenizer_config.json (a string,
// or a list of {name, template} from which "default" is taken), else DIR/chat_template.jinja.
// NotFound when the directory has neither.
StatusOr<std::string> ReadChatTemplate(const std::string& model_dir);

}  // namespace tandem::serve
