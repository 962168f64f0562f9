// ChatTemplate against the outputs `transformers`' apply_chat_template gives for real templates
// (Llama-3, Llama-2, ChatML, Zephyr/TinyLlama), plus the Jinja features they rely on.
#include "serve/chat_template.h"

#include <gtest/gtest.h>

#include <fstream>

#include "tests/common/testing.h"

namespace tandem::serve {
namespace {

// Meta-Llama-3-8B-Instruct's template, as the JSON string decodes (\n escapes inside literals).
constexpr char kLlama3[] =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

// Qwen2-style ChatML with a default system message.
constexpr char kChatMl[] =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
    "'<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

// TinyLlama/Zephyr: one tag per line; correct output needs trim_blocks.
constexpr char kZephyr[] =
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}";

// Llama-2-chat: slicing, raise_exception, comparisons of booleans, method calls.
constexpr char kLlama2[] =
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set "
    "system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set "
    "system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] "
    "== 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != "
    "false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + "
    "message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if "
    "message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}";

// A Llama-3.1-Instruct template with its tool-calling branches (written out from the published
// one): whitespace control everywhere, tuple unpacking, filters with arguments. A raw string, so
// its \n escapes reach the parser as the JSON string decodes.
constexpr char kLlama31[] = R"JINJA({{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %})JINJA";

std::string Render(const std::string& source, const std::vector<ChatMessage>& messages,
                   bool add_generation_prompt = true, const std::string& bos = "<s>",
                   const std::string& eos = "</s>") {
  StatusOr<ChatTemplate> t = ChatTemplate::Parse(source);
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  if (!t.ok()) return "<parse error>";
  StatusOr<std::string> out = t->Render(messages, add_generation_prompt, bos, eos);
  EXPECT_TRUE(out.ok()) << out.status().ToString();
  return out.ok() ? *out : "<render error>";
}

TEST(ChatTemplateTest, Llama3) {
  const std::vector<ChatMessage> messages = {{"system", "You are a bot."},
                                             {"user", " Hi there \n"}};
  EXPECT_EQ(Render(kLlama3, messages, true, "<|begin_of_text|>"),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a bot."
            "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_EQ(Render(kLlama3, {{"user", "x"}}, false, "<|begin_of_text|>"),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|>");
}

TEST(ChatTemplateTest, Llama31WithoutTools) {
  EXPECT_EQ(Render(kLlama31, {{"system", " S "}, {"user", "U"}}, true, "<|begin_of_text|>"),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
            "S<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_EQ(Render(kLlama31, {{"user", "U"}, {"assistant", "A"}}, false, "<|begin_of_text|>"),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>");
}

TEST(ChatTemplateTest, ChatMl) {
  EXPECT_EQ(Render(kChatMl, {{"user", "Hi"}, {"assistant", "Hello!"}, {"user", "Bye"}}),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
            "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(Render(kChatMl, {{"system", "S"}, {"user", "U"}}, false),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n");
}

TEST(ChatTemplateTest, ZephyrNeedsTrimBlocks) {
  EXPECT_EQ(Render(kZephyr, {{"system", "S"}, {"user", "U"}}),
            "<|system|>\nS</s>\n<|user|>\nU</s>\n<|assistant|>\n");
}

TEST(ChatTemplateTest, Llama2AndRaiseException) {
  EXPECT_EQ(
      Render(kLlama2, {{"system", "S"}, {"user", "U1 "}, {"assistant", "A1"}, {"user", "U2"}}),
      "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>[INST] U2 [/INST]");
  EXPECT_EQ(Render(kLlama2, {{"user", "U"}}), "<s>[INST] U [/INST]");
  StatusOr<ChatTemplate> t = ChatTemplate::Parse(kLlama2);
  ASSERT_TRUE(t.ok());
  StatusOr<std::string> out = t->Render({{"user", "a"}, {"user", "b"}}, true, "<s>", "</s>");
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(out.status().message(),
            "Conversation roles must alternate user/assistant/user/assistant/...");
}

TEST(ChatTemplateTest, Fallback) {
  StatusOr<std::string> out =
      ChatTemplate::Fallback().Render({{"system", "S"}, {"user", "U"}}, true, "<s>", "</s>");
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(*out, "<s>system: S\nuser: U\nassistant: ");
}

TEST(ChatTemplateTest, ExpressionsAndWhitespace) {
  const std::vector<ChatMessage> m = {{"user", "first"}, {"assistant", "mid"}, {"user", "last"}};
  const std::pair<const char*, const char*> cases[] = {
      {"{{ 'a' ~ 1 ~ none }}", "a1None"},
      {"{{ messages | length }}/{{ messages[-1]['content'] }}/{{ messages[0].role }}",
       "3/last/user"},
      {"{{ 'x' if messages|length > 5 else 'y' }}", "y"},
      {"{{ 7 // 2 }}{{ 7 % 3 }}{{ -2 + 5 * 2 }}", "318"},
      {"{{ 'ab' in 'cab' }} {{ 'z' not in ['a', 'z'] }} {{ 1 == 1 and not false }}",
       "True False True"},
      {"{{ undefined_thing is defined }} {{ none is none }} {{ 3 is not string }}",
       "False True True"},
      {"{{ '  a b  ' | trim | upper }}|{{ 'Ab'.lower() }}|{{ 'xay'.strip('xy') }}", "A B|ab|a"},
      {"{{ 'abc'[1:] }}{{ messages[1:] | length }}{{ [1, 2, 3][:-1] | join('-') }}", "bc21-2"},
      {"{{ 'hello'.startswith('he') }}{{ 'hello'.endswith('lo') }}", "TrueTrue"},
      {"{% set ns = namespace(n=0) %}{% for x in messages %}{% if x.role == 'user' %}"
       "{% set ns.n = ns.n + 1 %}{% endif %}{% endfor %}{{ ns.n }}",
       "2"},
      {"{% for x in messages %}{{ loop.index }}{{ loop.first }}{{ loop.last }},{% endfor %}",
       "1TrueFalse,2FalseFalse,3FalseTrue,"},
      {"{% set x = 1 %}{% for y in [5] %}{% set x = 2 %}{% endfor %}{{ x }}", "1"},
      {"{# comment #}a  {%- if true -%}  b  {%- endif -%}  c", "abc"},
      {"  {% if true %}\nA\n  {% endif %}\nB", "A\nB"},
      {"{{ 'a' }}\n{{ 'b' }}", "a\nb"},
      {"{% if false %}1{% elif add_generation_prompt %}2{% else %}3{% endif %}", "2"},
      {"{{ {'k': 'v'}['k'] }}{{ {'k': 'v'}.get('q', 'd') }}", "vd"},
      {"{{ \"it's\" }}", "it's"},
      {"{% for k, v in {'a': 1, 'b': 2} | items %}{{ k }}={{ v }};{% endfor %}", "a=1;b=2;"},
  };
  for (const auto& [source, expected] : cases) {
    EXPECT_EQ(Render(source, m), expected) << source;
  }
}

TEST(ChatTemplateTest, ParseErrorsNamePosition) {
  for (const char* bad : {"{% if x %}a", "{{ x ", "{% for x in %}{% endfor %}", "{% endif %}",
                          "{% macro m() %}{% endmacro %}", "{{ 'abc }}", "{{ a b }}"}) {
    StatusOr<ChatTemplate> t = ChatTemplate::Parse(bad);
    ASSERT_FALSE(t.ok()) << bad;
    EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument) << bad;
  }
  StatusOr<ChatTemplate> t = ChatTemplate::Parse("ok\n{{ a + }}");
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("line 2"), std::string::npos) << t.status().message();
  // Type errors are render-time errors.
  t = ChatTemplate::Parse("{{ 1 + 'a' }}");
  ASSERT_TRUE(t.ok());
  EXPECT_FALSE(t->Render({}, true, "", "").ok());
}

TEST(ChatTemplateTest, ReadChatTemplateFromModelDir) {
  testing::TempDir dir;
  EXPECT_EQ(ReadChatTemplate(dir.path()).status().code(), StatusCode::kNotFound);
  std::ofstream(dir.Join("tokenizer_config.json"))
      << R"({"bos_token": "<s>", "chat_template": "{{ bos_token }}hi"})";
  StatusOr<std::string> t = ReadChatTemplate(dir.path());
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ(*t, "{{ bos_token }}hi");
  std::ofstream(dir.Join("tokenizer_config.json"))
      << R"({"chat_template": [{"name": "tool_use", "template": "T"},)"
      << R"( {"name": "default", "template": "D"}]})";
  t = ReadChatTemplate(dir.path());
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ(*t, "D");
  std::ofstream(dir.Join("tokenizer_config.json")) << R"({"chat_template": 5})";
  EXPECT_EQ(ReadChatTemplate(dir.path()).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tandem::serve
