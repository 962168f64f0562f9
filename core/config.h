// Typed configuration: TOML files plus `--set section.key=value` overrides, bound to one plain
// struct per module.
//
// Each module declares its settings once, with defaults, docs and validators:
//
//   struct TrainConfig {
//     int64_t steps = 100;
//     double lr = 3e-4;
//     std::string schedule = "cosine";
//     static void Describe(tandem::ConfigSchema<TrainConfig>& s) {
//       s.Field("steps", &TrainConfig::steps, "optimizer steps to run").Min(1);
//       s.Field("lr", &TrainConfig::lr, "peak learning rate").Min(0.0);
//       s.Field("schedule", &TrainConfig::schedule, "learning-rate schedule")
//           .OneOf({"cosine", "linear", "constant"});
//     }
//   };
//
//   TANDEM_ASSIGN_OR_RETURN(ConfigDoc doc, ConfigDoc::FromTomlFile(path));
//   for (const std::string& s : overrides) TANDEM_RETURN_IF_ERROR(doc.ApplyOverride(s));
//   TrainConfig train;
//   TANDEM_RETURN_IF_ERROR(doc.Bind("train", &train));
//   ...bind every other module's section...
//   TANDEM_RETURN_IF_ERROR(doc.CheckNoUnknownKeys());
//
// Field types: bool, int32_t, int64_t, float, double, std::string, std::vector<int64_t>,
// std::vector<double>, std::vector<std::string>. Integers are accepted for float fields; floats
// are not accepted for integer fields. Min/Max apply to numbers (each element of a numeric list),
// OneOf to strings (each element of a string list).
//
// Errors are InvalidArgument and name the full key ("train.lr"), where its value came from
// ("x.toml:4" or "--set"), what was expected and what was found.
//
// Ownership and thread-safety: a ConfigDoc is a value that owns its parsed tree. Bind() is const
// but records which keys were used (for CheckNoUnknownKeys), so one ConfigDoc must not be used
// from several threads at once. Schemas are rebuilt per call and hold no state.
#pragma once

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <variant>
#include <vector>

#include "core/status.h"

namespace tandem {

namespace config_internal {

enum class FieldType {
  kBool,
  kInt32,
  kInt64,
  kFloat,
  kDouble,
  kString,
  kIntList,
  kDoubleList,
  kStringList
};

// A field's value in a type-erased form (int32 travels as int64, float as double).
using Value = std::variant<bool, int64_t, double, std::string, std::vector<int64_t>,
                           std::vector<double>, std::vector<std::string>>;

template <class T>
struct TypeOf;
template <>
struct TypeOf<bool> {
  static constexpr FieldType kType = FieldType::kBool;
};
template <>
struct TypeOf<int32_t> {
  static constexpr FieldType kType = FieldType::kInt32;
};
template <>
struct TypeOf<int64_t> {
  static constexpr FieldType kType = FieldType::kInt64;
};
template <>
struct TypeOf<float> {
  static constexpr FieldType kType = FieldType::kFloat;
};
template <>
struct TypeOf<double> {
  static constexpr FieldType kType = FieldType::kDouble;
};
template <>
struct TypeOf<std::string> {
  static constexpr FieldType kType = FieldType::kString;
};
template <>
struct TypeOf<std::vector<int64_t>> {
  static constexpr FieldType kType = FieldType::kIntList;
};
template <>
struct TypeOf<std::vector<double>> {
  static constexpr FieldType kType = FieldType::kDoubleList;
};
template <>
struct TypeOf<std::vector<std::string>> {
  static constexpr FieldType kType = FieldType::kStringList;
};

struct FieldSpec {
  std::string key;  // within the section, no dots
  std::string doc;
  FieldType type = FieldType::kBool;
  std::optional<double> min;
  std::optional<double> max;
  std::vector<std::string> choices;  // empty: any string
  // Stores `value` (already of this field's type and validated) into the struct at `object`.
  std::function<void(void* object, const Value& value)> set;
  // Reads this field from the struct at `object`.
  std::function<Value(const void* object)> get;
};

bool IsNumeric(FieldType type);
bool IsStringLike(FieldType type);
const char* TypeName(FieldType type);
std::string DescribeFields(std::string_view section, const std::vector<FieldSpec>& fields,
                           const void* defaults);
std::string FieldsToToml(std::string_view section, const std::vector<FieldSpec>& fields,
                         const void* object);

}  // namespace config_internal

// What a struct's Describe() fills in: one entry per field, in declaration order.
template <class S>
class ConfigSchema {
 public:
  // Chained validators on the field just declared. Misuse (Min on a string, OneOf on a number)
  // is a programmer error and aborts.
  class FieldOptions {
   public:
    FieldOptions& Min(double v) {
      TANDEM_CHECK_MSG(config_internal::IsNumeric(spec().type), "Min() on non-numeric field '",
                       spec().key, "'");
      spec().min = v;
      return *this;
    }
    FieldOptions& Max(double v) {
      TANDEM_CHECK_MSG(config_internal::IsNumeric(spec().type), "Max() on non-numeric field '",
                       spec().key, "'");
      spec().max = v;
      return *this;
    }
    FieldOptions& OneOf(std::initializer_list<std::string_view> choices) {
      TANDEM_CHECK_MSG(config_internal::IsStringLike(spec().type), "OneOf() on non-string field '",
                       spec().key, "'");
      spec().choices.assign(choices.begin(), choices.end());
      return *this;
    }

   private:
    friend class ConfigSchema;
    FieldOptions(std::vector<config_internal::FieldSpec>* fields, size_t index)
        : fields_(fields), index_(index) {}
    config_internal::FieldSpec& spec() { return (*fields_)[index_]; }
    std::vector<config_internal::FieldSpec>* fields_;
    size_t index_;
  };

  template <class T>
  FieldOptions Field(std::string_view key, T S::*member, std::string_view doc) {
    constexpr config_internal::FieldType kType = config_internal::TypeOf<T>::kType;
    for (const auto& f : fields_) {
      TANDEM_CHECK_MSG(f.key != key, "config field '", key, "' declared twice");
    }
    TANDEM_CHECK_MSG(!key.empty() && key.find('.') == std::string_view::npos, "config field key '",
                     key, "' must be non-empty and without dots");
    config_internal::FieldSpec spec;
    spec.key = std::string(key);
    spec.doc = std::string(doc);
    spec.type = kType;
    spec.set = [member](void* object, const config_internal::Value& v) {
      S& s = *static_cast<S*>(object);
      if constexpr (std::is_same_v<T, int32_t>) {
        s.*member = static_cast<int32_t>(std::get<int64_t>(v));
      } else if constexpr (std::is_same_v<T, float>) {
        s.*member = static_cast<float>(std::get<double>(v));
      } else {
        s.*member = std::get<T>(v);
      }
    };
    spec.get = [member](const void* object) -> config_internal::Value {
      const S& s = *static_cast<const S*>(object);
      if constexpr (std::is_same_v<T, int32_t>) {
        return static_cast<int64_t>(s.*member);
      } else if constexpr (std::is_same_v<T, float>) {
        return static_cast<double>(s.*member);
      } else {
        return s.*member;
      }
    };
    fields_.push_back(std::move(spec));
    return FieldOptions(&fields_, fields_.size() - 1);
  }

  const std::vector<config_internal::FieldSpec>& fields() const { return fields_; }

 private:
  std::vector<config_internal::FieldSpec> fields_;
};

template <class S>
std::vector<config_internal::FieldSpec> SchemaFields() {
  ConfigSchema<S> schema;
  S::Describe(schema);
  return schema.fields();
}

// A parsed TOML document plus command-line overrides. Movable, not copyable.
class ConfigDoc {
 public:
  ConfigDoc();  // empty document
  ~ConfigDoc();
  ConfigDoc(ConfigDoc&&) noexcept;
  ConfigDoc& operator=(ConfigDoc&&) noexcept;
  ConfigDoc(const ConfigDoc&) = delete;
  ConfigDoc& operator=(const ConfigDoc&) = delete;

  // NotFound if the file cannot be read; InvalidArgument "path:line:col: ..." on a syntax error.
  static StatusOr<ConfigDoc> FromTomlFile(const std::string& path);
  // `source_name` is used in messages in place of a file name.
  static StatusOr<ConfigDoc> FromTomlString(std::string_view text, std::string source_name);

  // Applies "section.key=value" (as from `--set`). The value is parsed as a TOML value (integer,
  // float, bool, quoted string, array); a bare word that is not a TOML value is taken as a string
  // (`train.schedule=linear`). Missing tables are created (`a.b.c=1`); an existing value is
  // replaced. A string field given a value that parses as another TOML type (`run.name=123`) gets
  // the raw text.
  Status ApplyOverride(std::string_view assignment);

  // Fills `out` from the table `section` (dotted for nested tables, "" for the root). Keys not in
  // the document keep the values `out` already has; keys used are recorded. Reports every bad
  // field in one InvalidArgument.
  template <class S>
  Status Bind(std::string_view section, S* out) const {
    return BindFields(section, SchemaFields<S>(), out);
  }

  // InvalidArgument listing every key and table that no Bind() used, each with its source and
  // the nearest known key or section when one is close.
  Status CheckNoUnknownKeys() const;

 private:
  struct Impl;
  explicit ConfigDoc(std::unique_ptr<Impl> impl);
  Status BindFields(std::string_view section, const std::vector<config_internal::FieldSpec>& fields,
                    void* out) const;
  std::unique_ptr<Impl> impl_;
};

// Help text, one line per field: "  section.key  (type, default X)  doc [range or choices]".
template <class S>
std::string DescribeSection(std::string_view section) {
  const S defaults{};
  return config_internal::DescribeFields(section, SchemaFields<S>(), &defaults);
}

// `value` as a TOML table headed [section] (no header for ""), one line per field; reading it
// back with ConfigDoc::FromTomlString and Bind gives the same values (floats round-trip exactly).
template <class S>
std::string ToToml(std::string_view section, const S& value) {
  return config_internal::FieldsToToml(section, SchemaFields<S>(), &value);
}

}  // namespace tandem
