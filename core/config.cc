#include "core/config.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <sstream>

#define TOML_HEADER_ONLY 1
#define TOML_EXCEPTIONS 0
#include <toml++/toml.h>

namespace tandem {
namespace config_internal {

bool IsNumeric(FieldType t) {
  return t == FieldType::kInt32 || t == FieldType::kInt64 || t == FieldType::kFloat ||
         t == FieldType::kDouble || t == FieldType::kIntList || t == FieldType::kDoubleList;
}

bool IsStringLike(FieldType t) { return t == FieldType::kString || t == FieldType::kStringList; }

const char* TypeName(FieldType t) {
  static constexpr const char* kNames[] = {"bool",          "int32",          "int64",
                                           "float",         "double",         "string",
                                           "list of int64", "list of double", "list of string"};
  return kNames[static_cast<int>(t)];
}

namespace {

bool IsIntType(FieldType t) {
  return t == FieldType::kInt32 || t == FieldType::kInt64 || t == FieldType::kIntList;
}

// Shortest text that reads back as the same value; always a TOML float (never an integer).
template <class F>
std::string FormatFloat(F v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  std::string s(buf, end);
  const size_t e = s.find('e');
  if (e == std::string::npos) {
    if (s.find('.') == std::string::npos) s += ".0";
    return s;
  }
  // "3e-04" -> "3e-4": the same TOML value, as people write it.
  size_t digits = e + 1 + (s[e + 1] == '-' || s[e + 1] == '+');
  while (digits + 1 < s.size() && s[digits] == '0') s.erase(digits, 1);
  return s;
}

// A validator bound as text: integers for integer fields, shortest float otherwise.
std::string FormatBound(FieldType t, double v) {
  if (IsIntType(t) && std::abs(v) < 9.0e15) return std::to_string(static_cast<int64_t>(v));
  return FormatFloat(v);
}

// A TOML basic string: quotes and backslashes escaped, control characters as \uXXXX.
std::string QuoteString(std::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (u < 0x20 || u == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", u);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string FormatOne(bool v) { return v ? "true" : "false"; }
std::string FormatOne(int64_t v) { return std::to_string(v); }
std::string FormatOne(double v) { return FormatFloat(v); }
std::string FormatOne(const std::string& v) { return QuoteString(v); }
template <class T>
std::string FormatOne(const std::vector<T>& v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + FormatOne(v[i]);
  return out + "]";
}

// A field's value as TOML text; float fields print the shortest text of the float itself.
std::string FormatValue(FieldType t, const Value& v) {
  if (t == FieldType::kFloat) return FormatFloat(static_cast<float>(std::get<double>(v)));
  return std::visit([](const auto& x) { return FormatOne(x); }, v);
}

std::string Constraint(const FieldSpec& f) {
  if (!f.choices.empty()) {
    std::string out = "one of: ";
    for (size_t i = 0; i < f.choices.size(); ++i) out += (i ? ", " : "") + f.choices[i];
    return out;
  }
  if (f.min && f.max)
    return StrCat("range [", FormatBound(f.type, *f.min), ", ", FormatBound(f.type, *f.max), "]");
  if (f.min) return ">= " + FormatBound(f.type, *f.min);
  if (f.max) return "<= " + FormatBound(f.type, *f.max);
  return "";
}

std::string JoinKey(std::string_view prefix, std::string_view key) {
  if (prefix.empty()) return std::string(key);
  return StrCat(prefix, ".", key);
}

}  // namespace

std::string DescribeFields(std::string_view section, const std::vector<FieldSpec>& fields,
                           const void* defaults) {
  size_t width = 0;
  for (const FieldSpec& f : fields) width = std::max(width, JoinKey(section, f.key).size());
  std::string out;
  for (const FieldSpec& f : fields) {
    std::string key = JoinKey(section, f.key);
    key.resize(width, ' ');
    out += StrCat("  ", key, "  (", TypeName(f.type), ", default ",
                  FormatValue(f.type, f.get(defaults)), ")  ", f.doc);
    const std::string c = Constraint(f);
    if (!c.empty()) out += " [" + c + "]";
    out += "\n";
  }
  return out;
}

std::string FieldsToToml(std::string_view section, const std::vector<FieldSpec>& fields,
                         const void* object) {
  std::string out = section.empty() ? "" : StrCat("[", section, "]\n");
  for (const FieldSpec& f : fields) {
    out += StrCat(f.key, " = ", FormatValue(f.type, f.get(object)), "\n");
  }
  return out;
}

}  // namespace config_internal

using config_internal::FieldSpec;
using config_internal::FieldType;
using config_internal::JoinKey;
using config_internal::Value;

namespace {

// What a node holds, for messages: `string "abc"`, `integer 3`, `array [1, 2]`.
std::string DescribeNode(const toml::node& node) {
  if (node.is_table()) return "a table";
  std::ostringstream os;
  if (node.is_floating_point()) {
    os << "float ";
  } else {
    os << node.type() << " ";  // "string", "integer", "boolean", "date", "array", ...
  }
  if (node.is_string()) {
    os << config_internal::QuoteString(node.as_string()->get());
  } else {
    node.visit([&os](const auto& n) { os << n; });
  }
  std::string text = os.str();
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  return text;
}

// Converts one scalar node to `type` (a scalar type). Returns "" or what was found instead.
std::string ConvertScalar(const toml::node& node, FieldType type, Value* out) {
  switch (type) {
    case FieldType::kBool:
      if (!node.is_boolean()) return DescribeNode(node);
      *out = node.as_boolean()->get();
      return "";
    case FieldType::kInt32:
    case FieldType::kInt64: {
      if (!node.is_integer()) return DescribeNode(node);
      const int64_t v = node.as_integer()->get();
      if (type == FieldType::kInt32 &&
          (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())) {
        return DescribeNode(node) + " (outside the int32 range)";
      }
      *out = v;
      return "";
    }
    case FieldType::kFloat:
    case FieldType::kDouble: {
      double v = 0;
      if (node.is_integer()) {
        v = static_cast<double>(node.as_integer()->get());
      } else if (node.is_floating_point()) {
        v = node.as_floating_point()->get();
      } else {
        return DescribeNode(node);
      }
      if (type == FieldType::kFloat && std::isfinite(v) && !std::isfinite(static_cast<float>(v))) {
        return DescribeNode(node) + " (outside the float range)";
      }
      *out = v;
      return "";
    }
    case FieldType::kString:
      if (!node.is_string()) return DescribeNode(node);
      *out = node.as_string()->get();
      return "";
    default:
      return "?";
  }
}

template <class T>
std::string ConvertList(const toml::node& node, FieldType elem_type, Value* out) {
  const toml::array* arr = node.as_array();
  if (arr == nullptr) return DescribeNode(node);
  std::vector<T> values;
  for (size_t i = 0; i < arr->size(); ++i) {
    Value v;
    const std::string found = ConvertScalar(*arr->get(i), elem_type, &v);
    if (!found.empty()) return StrCat("element [", i, "] = ", found);
    values.push_back(std::get<T>(std::move(v)));
  }
  *out = std::move(values);
  return "";
}

std::string Convert(const toml::node& node, FieldType type, Value* out) {
  switch (type) {
    case FieldType::kIntList:
      return ConvertList<int64_t>(node, FieldType::kInt64, out);
    case FieldType::kDoubleList:
      return ConvertList<double>(node, FieldType::kDouble, out);
    case FieldType::kStringList:
      return ConvertList<std::string>(node, FieldType::kString, out);
    default:
      return ConvertScalar(node, type, out);
  }
}

// Checks Min/Max/OneOf on a converted value (each element of a list); visit() returns "" or
// the violation.
struct Validator {
  const FieldSpec& f;
  std::string allowed;  // the constraint as text

  std::string Number(double x, const std::string& text) const {
    if ((f.min && x < *f.min) || (f.max && x > *f.max) || (std::isnan(x) && (f.min || f.max))) {
      return StrCat("value ", text, " is out of range (allowed: ", allowed, ")");
    }
    return "";
  }
  std::string operator()(bool) const { return ""; }
  std::string operator()(int64_t x) const { return Number(static_cast<double>(x), StrCat(x)); }
  std::string operator()(double x) const { return Number(x, config_internal::FormatFloat(x)); }
  std::string operator()(const std::string& s) const {
    if (f.choices.empty() || std::find(f.choices.begin(), f.choices.end(), s) != f.choices.end()) {
      return "";
    }
    return StrCat("value \"", s, "\" is not allowed (", allowed, ")");
  }
  template <class T>
  std::string operator()(const std::vector<T>& list) const {
    for (size_t k = 0; k < list.size(); ++k) {
      const std::string e = (*this)(list[k]);
      if (!e.empty()) return StrCat("element [", k, "]: ", e);
    }
    return "";
  }
};

std::string Validate(const FieldSpec& f, const Value& v) {
  return std::visit(Validator{f, config_internal::Constraint(f)}, v);
}

// Optimal-string-alignment distance: insertions, deletions, substitutions and adjacent
// transpositions each cost 1.
size_t EditDistance(std::string_view a, std::string_view b) {
  std::vector<std::vector<size_t>> d(a.size() + 1, std::vector<size_t>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) {
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
      }
    }
  }
  return d[a.size()][b.size()];
}

std::string_view Leaf(std::string_view key) {
  const size_t dot = key.rfind('.');
  return dot == std::string_view::npos ? key : key.substr(dot + 1);
}

// The candidate closest to `name`, or "" when none is close. A key with the same last part in
// another section counts as distance 1 (a key put in the wrong section).
std::string Nearest(const std::string& name, const std::set<std::string>& candidates) {
  std::string best;
  size_t best_d = std::numeric_limits<size_t>::max();
  for (const std::string& c : candidates) {
    size_t d = EditDistance(name, c);
    if (Leaf(c) == Leaf(name)) d = std::min<size_t>(d, 1);
    if (d < best_d) {
      best_d = d;
      best = c;
    }
  }
  const size_t limit = std::max<size_t>(2, Leaf(name).size() / 3);
  return best_d <= limit ? best : "";
}

bool IsBareKey(std::string_view s) {
  if (s.empty()) return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           c == '-';
  });
}

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

std::vector<std::string> SplitKey(std::string_view key) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    const size_t dot = key.find('.', start);
    parts.emplace_back(key.substr(start, dot == std::string_view::npos ? dot : dot - start));
    if (dot == std::string_view::npos) break;
    start = dot + 1;
  }
  return parts;
}

// Parses an override's value into {v = value}: a TOML value, or else a bare word taken as a
// string. Returns "" or why a value that looks like TOML (quoted, array, table) does not parse.
std::string ParseOverrideValue(std::string_view text, toml::table* out) {
  std::string error = "a value spans several lines";
  if (text.find('\n') == std::string_view::npos) {
    const std::string line = StrCat("v = ", text);
    toml::parse_result r = toml::parse(std::string_view(line), std::string_view("--set"));
    if (r && r.table().size() == 1 && r.table().contains("v")) {
      *out = std::move(r).table();
      return "";
    }
    error = r ? "extra keys after the value" : std::string(r.error().description());
    const char c = text.front();
    if (c != '"' && c != '\'' && c != '[' && c != '{') {
      out->insert_or_assign("v", std::string(text));
      return "";
    }
  }
  return error;
}

}  // namespace

struct ConfigDoc::Impl {
  toml::table root;
  std::string source_name;                        // file name or the caller's label
  std::map<std::string, std::string> set_values;  // full key -> raw text given to --set
  std::set<std::string> set_tables;               // tables created by --set
  mutable std::set<std::string> used_keys;        // full keys read by Bind()
  mutable std::set<std::string> bound_sections;   // sections passed to Bind()
  mutable std::set<std::string> known_keys;       // every field of every bound schema

  // "file:line" or "--set": where the value at `full_key` came from.
  std::string Where(const std::string& full_key, const toml::node& node) const {
    if (set_values.count(full_key) || set_tables.count(full_key)) return "--set";
    const toml::source_region& src = node.source();
    const std::string& file = src.path ? *src.path : source_name;
    if (src.begin.line == 0) return file;
    return StrCat(file, ":", src.begin.line);
  }

  void FindUnknown(const toml::table& table, const std::string& prefix,
                   std::vector<std::string>* errors) const;
};

ConfigDoc::ConfigDoc() : impl_(std::make_unique<Impl>()) {}
ConfigDoc::ConfigDoc(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ConfigDoc::~ConfigDoc() = default;
ConfigDoc::ConfigDoc(ConfigDoc&&) noexcept = default;
ConfigDoc& ConfigDoc::operator=(ConfigDoc&&) noexcept = default;

StatusOr<ConfigDoc> ConfigDoc::FromTomlFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFoundError(StrCat("cannot open config file '", path, "'"));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return DataLossError(StrCat("error reading config file '", path, "'"));
  return FromTomlString(text.str(), path);
}

StatusOr<ConfigDoc> ConfigDoc::FromTomlString(std::string_view text, std::string source_name) {
  toml::parse_result result = toml::parse(text, std::string_view(source_name));
  if (!result) {
    const toml::parse_error& e = result.error();
    return InvalidArgumentError(StrCat(source_name, ":", e.source().begin.line, ":",
                                       e.source().begin.column,
                                       ": TOML syntax error: ", e.description()));
  }
  auto impl = std::make_unique<Impl>();
  impl->root = std::move(result).table();
  impl->source_name = std::move(source_name);
  return ConfigDoc(std::move(impl));
}

Status ConfigDoc::ApplyOverride(std::string_view assignment) {
  const size_t eq = assignment.find('=');
  if (eq == std::string_view::npos) {
    return InvalidArgumentError(
        StrCat("--set '", assignment, "': expected section.key=value, found no '='"));
  }
  const std::string key(Trim(assignment.substr(0, eq)));
  const std::string_view text = Trim(assignment.substr(eq + 1));
  const std::vector<std::string> parts = SplitKey(key);
  for (const std::string& p : parts) {
    if (!IsBareKey(p)) {
      return InvalidArgumentError(StrCat("--set '", assignment, "': bad key '", key,
                                         "' (expected dotted names of letters, digits, _ and -)"));
    }
  }
  if (text.empty()) {
    return InvalidArgumentError(
        StrCat("--set '", assignment, "': empty value (write ", key, "=\"\" for an empty string)"));
  }
  toml::table parsed;  // {v = <the value>}
  const std::string error = ParseOverrideValue(text, &parsed);
  if (!error.empty()) {
    return InvalidArgumentError(StrCat("--set '", assignment, "': value is not valid TOML: ", error,
                                       " (strings inside arrays need quotes: [\"a\", \"b\"])"));
  }
  toml::table* table = &impl_->root;
  std::string prefix;
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    prefix = JoinKey(prefix, parts[i]);
    toml::node* node = table->get(parts[i]);
    if (node == nullptr) {
      node = table->insert_or_assign(parts[i], toml::table{}).first->second.as_table();
      impl_->set_tables.insert(prefix);
    }
    if (!node->is_table()) {
      return InvalidArgumentError(StrCat("--set '", assignment, "': '", prefix, "' (",
                                         impl_->Where(prefix, *node), ") is ", DescribeNode(*node),
                                         ", not a table"));
    }
    table = node->as_table();
  }
  table->insert_or_assign(parts.back(), std::move(*parsed.get("v")));
  impl_->set_values[key] = std::string(text);
  return Status::Ok();
}

Status ConfigDoc::BindFields(std::string_view section, const std::vector<FieldSpec>& fields,
                             void* out) const {
  const std::string sec(section);
  impl_->bound_sections.insert(sec);
  for (const FieldSpec& f : fields) impl_->known_keys.insert(JoinKey(sec, f.key));
  // Find the section's table; a missing one leaves every default in place.
  const toml::table* table = &impl_->root;
  std::string prefix;
  for (const std::string& part : section.empty() ? std::vector<std::string>{} : SplitKey(sec)) {
    prefix = JoinKey(prefix, part);
    const toml::node* node = table->get(part);
    if (node == nullptr) return Status::Ok();
    if (!node->is_table()) {
      return InvalidArgumentError(StrCat("config key '", prefix, "' (", impl_->Where(prefix, *node),
                                         "): expected a table [", prefix, "], found ",
                                         DescribeNode(*node)));
    }
    table = node->as_table();
  }
  // Convert and validate everything first, so that `out` changes only when all fields are good.
  std::vector<std::string> errors;
  std::vector<std::pair<const FieldSpec*, Value>> values;
  for (const FieldSpec& f : fields) {
    const toml::node* node = table->get(f.key);
    if (node == nullptr) continue;
    const std::string full = JoinKey(sec, f.key);
    impl_->used_keys.insert(full);
    Value v;
    std::string found = Convert(*node, f.type, &v);
    const auto raw = impl_->set_values.find(full);
    if (!found.empty() && f.type == FieldType::kString && raw != impl_->set_values.end()) {
      v = raw->second;  // --set run.name=123 for a string field means the text "123"
      found.clear();
    }
    std::string problem;
    if (!found.empty()) {
      problem = StrCat("expected ", config_internal::TypeName(f.type), ", found ", found);
    } else {
      problem = Validate(f, v);
    }
    if (!problem.empty()) {
      errors.push_back(
          StrCat("config key '", full, "' (", impl_->Where(full, *node), "): ", problem));
      continue;
    }
    values.emplace_back(&f, std::move(v));
  }
  if (!errors.empty()) {
    std::string msg = errors[0];
    for (size_t i = 1; i < errors.size(); ++i) msg += "\n" + errors[i];
    return InvalidArgumentError(msg);
  }
  for (const auto& [f, v] : values) f->set(out, v);
  return Status::Ok();
}

void ConfigDoc::Impl::FindUnknown(const toml::table& table, const std::string& prefix,
                                  std::vector<std::string>* errors) const {
  for (const auto& [k, node] : table) {
    const std::string full = JoinKey(prefix, k.str());
    if (used_keys.count(full)) continue;
    if (node.is_table()) {
      const bool holds_bound =
          std::any_of(bound_sections.begin(), bound_sections.end(), [&full](const std::string& s) {
            return s == full || (s.size() > full.size() && s.compare(0, full.size(), full) == 0 &&
                                 s[full.size()] == '.');
          });
      if (holds_bound) {
        FindUnknown(*node.as_table(), full, errors);
        continue;
      }
      std::set<std::string> sections;
      for (const std::string& s : bound_sections) {
        for (size_t dot = s.find('.'); dot != std::string::npos; dot = s.find('.', dot + 1)) {
          sections.insert(s.substr(0, dot));
        }
        if (!s.empty()) sections.insert(s);
      }
      const std::string hint = Nearest(full, sections);
      errors->push_back(StrCat("unknown section '", full, "' (", Where(full, node), ")",
                               hint.empty() ? "" : StrCat("; did you mean '", hint, "'?")));
      continue;
    }
    const std::string hint = Nearest(full, known_keys);
    errors->push_back(StrCat("unknown key '", full, "' (", Where(full, node), ")",
                             hint.empty() ? "" : StrCat("; did you mean '", hint, "'?")));
  }
}

Status ConfigDoc::CheckNoUnknownKeys() const {
  std::vector<std::string> errors;
  impl_->FindUnknown(impl_->root, "", &errors);
  if (errors.empty()) return Status::Ok();
  std::string msg = errors[0];
  for (size_t i = 1; i < errors.size(); ++i) msg += "\n" + errors[i];
  return InvalidArgumentError(msg);
}

}  // namespace tandem
