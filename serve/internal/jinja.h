// A small Jinja2 interpreter for chat templates (see serve/chat_template.h for the subset).
//
// Parse() turns template source into a tree of TemplateNodes (text, output, if, for, set), with
// HF's trim_blocks and lstrip_blocks whitespace rules applied to the text; Render() walks it.
// Values are Python-like: undefined, none, bool, int, string, list, dict; lists and dicts are
// shared by reference (as in Python), which `namespace()` relies on.
// Thread-safety: parsed trees are immutable; Render keeps its state on the stack.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"

namespace tandem::serve::internal {

struct Value;
using ValueList = std::vector<Value>;
using ValueDict = std::map<std::string, Value>;

struct Value {
  enum class Type { kUndefined, kNone, kBool, kInt, kString, kList, kDict };
  Type type = Type::kUndefined;
  bool b = false;
  int64_t i = 0;
  std::string s;
  std::shared_ptr<ValueList> list;
  std::shared_ptr<ValueDict> dict;

  static Value None() { return Value{Type::kNone}; }
  static Value Bool(bool v) {
    Value x{Type::kBool};
    x.b = v;
    return x;
  }
  static Value Int(int64_t v) {
    Value x{Type::kInt};
    x.i = v;
    return x;
  }
  static Value Str(std::string v) {
    Value x{Type::kString};
    x.s = std::move(v);
    return x;
  }
  static Value List(ValueList v = {}) {
    Value x{Type::kList};
    x.list = std::make_shared<ValueList>(std::move(v));
    return x;
  }
  static Value Dict(ValueDict v = {}) {
    Value x{Type::kDict};
    x.dict = std::make_shared<ValueDict>(std::move(v));
    return x;
  }
};

struct Expr;
using ExprPtr = std::shared_ptr<const Expr>;

struct Expr {
  enum class Kind {
    kLiteral,  // value
    kName,     // name
    kList,     // args: items
    kDict,     // keys (names) and args: values
    kAttr,     // args[0].name
    kIndex,    // args[0][args[1]]
    kSlice,    // args[0][args[1]:args[2]] (null operands mean "open")
    kCall,     // args[0](args[1..]) with keyword names in keys (parallel to args[1..], "" =
               // positional)
    kFilter,   // args[0] | name(args[1..])
    kTest,     // args[0] is [not] name   (op "not" when negated)
    kUnary,    // op args[0]: "not", "-"
    kBinary,   // args[0] op args[1]
    kCond,     // args[1] if args[0] else args[2]
  };
  Kind kind = Kind::kLiteral;
  Value value;
  std::string name;
  std::string op;
  std::vector<ExprPtr> args;
  std::vector<std::string> keys;
  size_t pos = 0;  // offset in the template source, for errors
};

struct TemplateNode {
  enum class Kind { kRoot, kText, kOutput, kIf, kFor, kSet };
  Kind kind = Kind::kRoot;
  std::string text;                 // kText
  ExprPtr expr;                     // kOutput, kSet (value), kFor (iterable)
  std::vector<ExprPtr> conditions;  // kIf: one per branch; null for else
  std::vector<std::vector<std::shared_ptr<const TemplateNode>>> branches;  // kIf
  std::vector<std::shared_ptr<const TemplateNode>> body;                   // kRoot, kFor
  std::string target;               // kFor loop variable, kSet name
  std::vector<std::string> unpack;  // kFor over pairs: `for a, b in ...` (then target is "")
  std::string attr;                 // kSet of "name.attr"
  size_t pos = 0;
};
using NodePtr = std::shared_ptr<const TemplateNode>;

// Errors name the offset (and line) of the problem in `source`.
StatusOr<NodePtr> ParseTemplate(const std::string& source);

// Renders `root` with the given global variables.
StatusOr<std::string> RenderTemplate(const TemplateNode& root, const ValueDict& globals);

}  // namespace tandem::serve::internal
