// Jinja rendering: walks the tree with Python-like values.
#include <algorithm>
#include <cctype>
#include <string>
#include <utility>
#include <vector>

#include "serve/internal/jinja.h"

// Template errors reach the API user (a 400 from raise_exception), so they carry no file:line.
#define JINJA_RETURN_IF_ERROR(expr)           \
  do {                                        \
    const ::tandem::Status jinja_s_ = (expr); \
    if (!jinja_s_.ok()) return jinja_s_;      \
  } while (0)
#define JINJA_ASSIGN_OR_RETURN(lhs, expr) \
  JINJA_ASSIGN_OR_RETURN_IMPL(TANDEM_STATUS_CONCAT(jinja_v_, __LINE__), lhs, expr)
#define JINJA_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                \
  if (!tmp.ok()) return tmp.status();               \
  lhs = std::move(tmp).value()

namespace tandem::serve::internal {
namespace {

using T = Value::Type;
constexpr int64_t kMaxRange = 1 << 20;
constexpr size_t kMaxOutputBytes = 64 << 20;

bool Truthy(const Value& v) {
  switch (v.type) {
    case T::kBool:
      return v.b;
    case T::kInt:
      return v.i != 0;
    case T::kString:
      return !v.s.empty();
    case T::kList:
      return !v.list->empty();
    case T::kDict:
      return !v.dict->empty();
    default:
      return false;
  }
}

std::string Repr(const Value& v);

// str(v) as Jinja prints it.
std::string Str(const Value& v) {
  switch (v.type) {
    case T::kUndefined:
      return "";
    case T::kNone:
      return "None";
    case T::kBool:
      return v.b ? "True" : "False";
    case T::kInt:
      return std::to_string(v.i);
    case T::kString:
      return v.s;
    default:
      return Repr(v);
  }
}

std::string Repr(const Value& v) {
  if (v.type == T::kString) return "'" + v.s + "'";
  if (v.type == T::kList) {
    std::string out = "[";
    for (size_t i = 0; i < v.list->size(); ++i) out += (i ? ", " : "") + Repr((*v.list)[i]);
    return out + "]";
  }
  if (v.type == T::kDict) {
    std::string out = "{";
    for (const auto& [k, x] : *v.dict) out += (out.size() > 1 ? ", '" : "'") + k + "': " + Repr(x);
    return out + "}";
  }
  return Str(v);
}

std::string Json(const Value& v) {
  switch (v.type) {
    case T::kString: {
      std::string out = "\"";
      for (char c : v.s) {
        if (c == '"' || c == '\\')
          out += {'\\', c};
        else if (c == '\n')
          out += "\\n";
        else
          out += c;
      }
      return out + "\"";
    }
    case T::kBool:
      return v.b ? "true" : "false";
    case T::kInt:
      return std::to_string(v.i);
    case T::kList: {
      std::string out = "[";
      for (size_t i = 0; i < v.list->size(); ++i) out += (i ? ", " : "") + Json((*v.list)[i]);
      return out + "]";
    }
    case T::kDict: {
      std::string out = "{";
      for (const auto& [k, x] : *v.dict) {
        out += (out.size() > 1 ? ", " : "") + Json(Value::Str(k)) + ": " + Json(x);
      }
      return out + "}";
    }
    default:
      return "null";
  }
}

bool Equal(const Value& a, const Value& b) {
  if ((a.type == T::kInt || a.type == T::kBool) && (b.type == T::kInt || b.type == T::kBool)) {
    return (a.type == T::kInt ? a.i : a.b) == (b.type == T::kInt ? b.i : b.b);
  }
  if (a.type != b.type) return false;
  switch (a.type) {
    case T::kString:
      return a.s == b.s;
    case T::kList:
      return a.list->size() == b.list->size() &&
             std::equal(a.list->begin(), a.list->end(), b.list->begin(), Equal);
    case T::kDict:
      return a.dict == b.dict;
    default:
      return true;  // undefined == undefined, none == none
  }
}

std::string Strip(const std::string& s, bool left, bool right, const std::string& chars) {
  size_t b = 0, e = s.size();
  while (left && b < e && chars.find(s[b]) != std::string::npos) ++b;
  while (right && e > b && chars.find(s[e - 1]) != std::string::npos) --e;
  return s.substr(b, e - b);
}

std::string Cased(std::string s, bool upper) {
  for (char& c : s) c = static_cast<char>(upper ? std::toupper(c) : std::tolower(c));
  return s;
}

// Python index normalization: negative counts from the end; false when out of range.
bool NormIndex(int64_t size, int64_t* i) {
  if (*i < 0) *i += size;
  return *i >= 0 && *i < size;
}

class Renderer {
 public:
  explicit Renderer(const ValueDict& globals) { scopes_.push_back(globals); }
  Status Run(const std::vector<NodePtr>& nodes, std::string* out);

 private:
  Status Error(size_t pos, const std::string& what) {
    return InvalidArgumentError(StrCat(what, " (template offset ", pos, ")"));
  }
  Value Lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto found = it->find(name);
      if (found != it->end()) return found->second;
    }
    return Value{};
  }
  StatusOr<Value> Eval(const Expr& e);
  StatusOr<Value> Binary(const Expr& e);
  StatusOr<Value> Call(const Expr& e);
  StatusOr<Value> Method(const Expr& e, const Value& self, const std::vector<Value>& args);
  StatusOr<Value> Filter(const Expr& e);
  StatusOr<Value> Test(const Expr& e);
  StatusOr<Value> Subscript(const Expr& e);
  Status For(const TemplateNode& n, std::string* out);

  std::vector<ValueDict> scopes_;
};

Status Renderer::Run(const std::vector<NodePtr>& nodes, std::string* out) {
  for (const NodePtr& node : nodes) {
    const TemplateNode& n = *node;
    switch (n.kind) {
      case TemplateNode::Kind::kText:
        *out += n.text;
        break;
      case TemplateNode::Kind::kOutput: {
        JINJA_ASSIGN_OR_RETURN(Value v, Eval(*n.expr));
        *out += Str(v);
        break;
      }
      case TemplateNode::Kind::kIf:
        for (size_t b = 0; b < n.branches.size(); ++b) {
          bool take = n.conditions[b] == nullptr;
          if (!take) {
            JINJA_ASSIGN_OR_RETURN(Value c, Eval(*n.conditions[b]));
            take = Truthy(c);
          }
          if (take) {
            JINJA_RETURN_IF_ERROR(Run(n.branches[b], out));
            break;
          }
        }
        break;
      case TemplateNode::Kind::kFor:
        JINJA_RETURN_IF_ERROR(For(n, out));
        break;
      case TemplateNode::Kind::kSet: {
        JINJA_ASSIGN_OR_RETURN(Value v, Eval(*n.expr));
        if (n.attr.empty()) {
          scopes_.back()[n.target] = std::move(v);
          break;
        }
        Value ns = Lookup(n.target);
        if (ns.type != T::kDict)
          return Error(n.pos,
                       "set " + n.target + "." + n.attr + ": " + n.target + " is not a namespace");
        (*ns.dict)[n.attr] = std::move(v);
        break;
      }
      case TemplateNode::Kind::kRoot:
        JINJA_RETURN_IF_ERROR(Run(n.body, out));
        break;
    }
    if (out->size() > kMaxOutputBytes) return Error(n.pos, "template output is too large");
  }
  return Status::Ok();
}

Status Renderer::For(const TemplateNode& n, std::string* out) {
  JINJA_ASSIGN_OR_RETURN(Value seq, Eval(*n.expr));
  ValueList items;
  if (seq.type == T::kList) {
    items = *seq.list;
  } else if (seq.type == T::kDict) {
    for (const auto& kv : *seq.dict) items.push_back(Value::Str(kv.first));
  } else if (seq.type == T::kString) {
    for (char c : seq.s) items.push_back(Value::Str(std::string(1, c)));
  } else if (seq.type != T::kUndefined && seq.type != T::kNone) {
    return Error(n.pos, "for: the value is not iterable: " + Repr(seq));
  }
  const int64_t len = static_cast<int64_t>(items.size());
  for (int64_t i = 0; i < len; ++i) {
    ValueDict loop = {{"index", Value::Int(i + 1)},          {"index0", Value::Int(i)},
                      {"first", Value::Bool(i == 0)},        {"last", Value::Bool(i == len - 1)},
                      {"length", Value::Int(len)},           {"revindex", Value::Int(len - i)},
                      {"revindex0", Value::Int(len - i - 1)}};
    scopes_.push_back({{"loop", Value::Dict(std::move(loop))}});
    if (n.unpack.empty()) {
      scopes_.back()[n.target] = items[i];
    } else {
      const Value& item = items[i];
      if (item.type != T::kList || item.list->size() != n.unpack.size()) {
        scopes_.pop_back();
        return Error(
            n.pos, StrCat("for: cannot unpack ", Repr(item), " into ", n.unpack.size(), " names"));
      }
      for (size_t k = 0; k < n.unpack.size(); ++k) scopes_.back()[n.unpack[k]] = (*item.list)[k];
    }
    Status s = Run(n.body, out);
    scopes_.pop_back();
    JINJA_RETURN_IF_ERROR(s);
  }
  return Status::Ok();
}

StatusOr<Value> Renderer::Eval(const Expr& e) {
  switch (e.kind) {
    case Expr::Kind::kLiteral:
      return e.value;
    case Expr::Kind::kName:
      return Lookup(e.name);
    case Expr::Kind::kList: {
      ValueList items;
      for (const ExprPtr& a : e.args) {
        JINJA_ASSIGN_OR_RETURN(Value v, Eval(*a));
        items.push_back(std::move(v));
      }
      return Value::List(std::move(items));
    }
    case Expr::Kind::kDict: {
      ValueDict d;
      for (size_t i = 0; i < e.args.size(); ++i) {
        JINJA_ASSIGN_OR_RETURN(d[e.keys[i]], Eval(*e.args[i]));
      }
      return Value::Dict(std::move(d));
    }
    case Expr::Kind::kAttr: {
      JINJA_ASSIGN_OR_RETURN(Value base, Eval(*e.args[0]));
      if (base.type != T::kDict) return Value{};
      auto it = base.dict->find(e.name);
      return it == base.dict->end() ? Value{} : it->second;
    }
    case Expr::Kind::kIndex:
    case Expr::Kind::kSlice:
      return Subscript(e);
    case Expr::Kind::kCall:
      return Call(e);
    case Expr::Kind::kFilter:
      return Filter(e);
    case Expr::Kind::kTest:
      return Test(e);
    case Expr::Kind::kUnary: {
      JINJA_ASSIGN_OR_RETURN(Value v, Eval(*e.args[0]));
      if (e.op == "not") return Value::Bool(!Truthy(v));
      if (v.type != T::kInt) return Error(e.pos, "unary '-' needs an integer, found " + Repr(v));
      return Value::Int(-v.i);
    }
    case Expr::Kind::kBinary:
      return Binary(e);
    case Expr::Kind::kCond: {
      JINJA_ASSIGN_OR_RETURN(Value c, Eval(*e.args[0]));
      return Eval(*e.args[Truthy(c) ? 1 : 2]);
    }
  }
  return Value{};
}

StatusOr<Value> Renderer::Subscript(const Expr& e) {
  JINJA_ASSIGN_OR_RETURN(Value base, Eval(*e.args[0]));
  if (e.kind == Expr::Kind::kIndex) {
    JINJA_ASSIGN_OR_RETURN(Value key, Eval(*e.args[1]));
    if (base.type == T::kDict && key.type == T::kString) {
      auto it = base.dict->find(key.s);
      return it == base.dict->end() ? Value{} : it->second;
    }
    if (key.type != T::kInt) return Value{};
    int64_t i = key.i;
    if (base.type == T::kList && NormIndex(static_cast<int64_t>(base.list->size()), &i)) {
      return (*base.list)[i];
    }
    if (base.type == T::kString && NormIndex(static_cast<int64_t>(base.s.size()), &i)) {
      return Value::Str(std::string(1, base.s[i]));
    }
    return Value{};
  }
  const int64_t size = base.type == T::kList     ? static_cast<int64_t>(base.list->size())
                       : base.type == T::kString ? static_cast<int64_t>(base.s.size())
                                                 : -1;
  if (size < 0) return Error(e.pos, "slice of a value that is not a list or string");
  int64_t bounds[2] = {0, size};
  for (int k = 0; k < 2; ++k) {
    if (!e.args[k + 1]) continue;
    JINJA_ASSIGN_OR_RETURN(Value v, Eval(*e.args[k + 1]));
    if (v.type != T::kInt) return Error(e.pos, "slice bounds must be integers");
    bounds[k] = std::clamp<int64_t>(v.i < 0 ? v.i + size : v.i, 0, size);
  }
  const int64_t lo = bounds[0], hi = std::max(bounds[0], bounds[1]);
  if (base.type == T::kString) return Value::Str(base.s.substr(lo, hi - lo));
  return Value::List(ValueList(base.list->begin() + lo, base.list->begin() + hi));
}

StatusOr<Value> Renderer::Binary(const Expr& e) {
  JINJA_ASSIGN_OR_RETURN(Value a, Eval(*e.args[0]));
  if (e.op == "and") return Truthy(a) ? Eval(*e.args[1]) : a;
  if (e.op == "or") return Truthy(a) ? a : Eval(*e.args[1]);
  JINJA_ASSIGN_OR_RETURN(Value b, Eval(*e.args[1]));
  const std::string& op = e.op;
  if (op == "==") return Value::Bool(Equal(a, b));
  if (op == "!=") return Value::Bool(!Equal(a, b));
  if (op == "~") return Value::Str(Str(a) + Str(b));
  if (op == "in" || op == "not in") {
    bool found = false;
    if (b.type == T::kString && a.type == T::kString) found = b.s.find(a.s) != std::string::npos;
    if (b.type == T::kList) {
      found =
          std::any_of(b.list->begin(), b.list->end(), [&](const Value& x) { return Equal(a, x); });
    }
    if (b.type == T::kDict && a.type == T::kString) found = b.dict->count(a.s) > 0;
    return Value::Bool(op == "in" ? found : !found);
  }
  if (op == "+" && a.type == T::kString && b.type == T::kString) return Value::Str(a.s + b.s);
  if (op == "+" && a.type == T::kList && b.type == T::kList) {
    ValueList items = *a.list;
    items.insert(items.end(), b.list->begin(), b.list->end());
    return Value::List(std::move(items));
  }
  if (a.type == T::kString && b.type == T::kString) {
    if (op == "<") return Value::Bool(a.s < b.s);
    if (op == ">") return Value::Bool(a.s > b.s);
    if (op == "<=") return Value::Bool(a.s <= b.s);
    if (op == ">=") return Value::Bool(a.s >= b.s);
  }
  if (a.type != T::kInt || b.type != T::kInt) {
    return Error(e.pos, StrCat("'", op, "' cannot combine ", Repr(a), " and ", Repr(b)));
  }
  if ((op == "//" || op == "%") && b.i == 0) return Error(e.pos, "division by zero");
  if (op == "+") return Value::Int(a.i + b.i);
  if (op == "-") return Value::Int(a.i - b.i);
  if (op == "*") return Value::Int(a.i * b.i);
  if (op == "//") return Value::Int(a.i / b.i);
  if (op == "%") return Value::Int(((a.i % b.i) + b.i) % b.i);
  if (op == "<") return Value::Bool(a.i < b.i);
  if (op == ">") return Value::Bool(a.i > b.i);
  if (op == "<=") return Value::Bool(a.i <= b.i);
  if (op == ">=") return Value::Bool(a.i >= b.i);
  return Error(e.pos, "unsupported operator '" + op + "'");
}

StatusOr<Value> Renderer::Call(const Expr& e) {
  std::vector<Value> args;
  ValueDict kwargs;
  for (size_t i = 1; i < e.args.size(); ++i) {
    JINJA_ASSIGN_OR_RETURN(Value v, Eval(*e.args[i]));
    if (e.keys[i - 1].empty())
      args.push_back(std::move(v));
    else
      kwargs[e.keys[i - 1]] = std::move(v);
  }
  const Expr& callee = *e.args[0];
  if (callee.kind == Expr::Kind::kAttr) {
    JINJA_ASSIGN_OR_RETURN(Value self, Eval(*callee.args[0]));
    return Method(callee, self, args);
  }
  const std::string name = callee.kind == Expr::Kind::kName ? callee.name : "";
  if (name == "raise_exception") {
    return InvalidArgumentError(args.empty() ? "raise_exception()" : Str(args[0]));
  }
  if (name == "namespace") return Value::Dict(std::move(kwargs));
  if (name == "range" && !args.empty() && args[0].type == T::kInt) {
    if (args[0].i > kMaxRange) return Error(e.pos, "range() is too long");
    ValueList items;
    for (int64_t i = 0; i < args[0].i; ++i) items.push_back(Value::Int(i));
    return Value::List(std::move(items));
  }
  return Error(e.pos, "unsupported function '" + (name.empty() ? "<expression>" : name) + "'");
}

StatusOr<Value> Renderer::Method(const Expr& e, const Value& self, const std::vector<Value>& args) {
  const std::string& m = e.name;
  const std::string arg0 = args.empty() ? "" : Str(args[0]);
  if (self.type == T::kString) {
    const std::string ws = args.empty() ? " \t\r\n\f\v" : arg0;
    if (m == "strip") return Value::Str(Strip(self.s, true, true, ws));
    if (m == "lstrip") return Value::Str(Strip(self.s, true, false, ws));
    if (m == "rstrip") return Value::Str(Strip(self.s, false, true, ws));
    if (m == "upper" || m == "lower") return Value::Str(Cased(self.s, m == "upper"));
    if (m == "startswith") return Value::Bool(self.s.rfind(arg0, 0) == 0);
    if (m == "endswith") {
      return Value::Bool(self.s.size() >= arg0.size() &&
                         self.s.compare(self.s.size() - arg0.size(), arg0.size(), arg0) == 0);
    }
  }
  if (self.type == T::kDict) {
    if (m == "get") {
      auto it = self.dict->find(arg0);
      return it != self.dict->end() ? it->second : args.size() > 1 ? args[1] : Value::None();
    }
    if (m == "items" || m == "keys" || m == "values") {
      ValueList items;
      for (const auto& [k, v] : *self.dict) {
        items.push_back(m == "keys"     ? Value::Str(k)
                        : m == "values" ? v
                                        : Value::List({Value::Str(k), v}));
      }
      return Value::List(std::move(items));
    }
  }
  return Error(e.pos, "unsupported method '" + m + "' on " + Repr(self));
}

StatusOr<Value> Renderer::Filter(const Expr& e) {
  JINJA_ASSIGN_OR_RETURN(Value v, Eval(*e.args[0]));
  std::vector<Value> args;
  for (size_t i = 1; i < e.args.size(); ++i) {
    JINJA_ASSIGN_OR_RETURN(Value a, Eval(*e.args[i]));
    args.push_back(std::move(a));
  }
  const std::string& f = e.name;
  if (f == "trim") return Value::Str(Strip(Str(v), true, true, " \t\r\n\f\v"));
  if (f == "upper" || f == "lower") return Value::Str(Cased(Str(v), f == "upper"));
  if (f == "string") return Value::Str(Str(v));
  if (f == "tojson") return Value::Str(Json(v));
  if (f == "default") return v.type == T::kUndefined && !args.empty() ? args[0] : v;
  if (f == "items" && v.type == T::kDict) {
    ValueList items;
    for (const auto& [k, x] : *v.dict) items.push_back(Value::List({Value::Str(k), x}));
    return Value::List(std::move(items));
  }
  if (f == "length" || f == "count") {
    if (v.type == T::kString) return Value::Int(static_cast<int64_t>(v.s.size()));
    if (v.type == T::kList) return Value::Int(static_cast<int64_t>(v.list->size()));
    if (v.type == T::kDict) return Value::Int(static_cast<int64_t>(v.dict->size()));
    return Error(e.pos, "length of a value without one: " + Repr(v));
  }
  if ((f == "first" || f == "last") && v.type == T::kList) {
    if (v.list->empty()) return Value{};
    return f == "first" ? v.list->front() : v.list->back();
  }
  if (f == "join" && v.type == T::kList) {
    std::string out;
    for (size_t i = 0; i < v.list->size(); ++i) {
      out += (i && !args.empty() ? Str(args[0]) : "") + Str((*v.list)[i]);
    }
    return Value::Str(out);
  }
  return Error(e.pos, "unsupported filter '" + f + "' for " + Repr(v));
}

StatusOr<Value> Renderer::Test(const Expr& e) {
  JINJA_ASSIGN_OR_RETURN(Value v, Eval(*e.args[0]));
  const std::string& t = e.name;
  bool r;
  if (t == "defined")
    r = v.type != T::kUndefined;
  else if (t == "undefined")
    r = v.type == T::kUndefined;
  else if (t == "none")
    r = v.type == T::kNone;
  else if (t == "string")
    r = v.type == T::kString;
  else if (t == "number" || t == "integer")
    r = v.type == T::kInt;
  else if (t == "boolean")
    r = v.type == T::kBool;
  else if (t == "true" || t == "false")
    r = v.type == T::kBool && v.b == (t == "true");
  else if (t == "mapping")
    r = v.type == T::kDict;
  else if (t == "sequence" || t == "iterable") {
    r = v.type == T::kList || v.type == T::kString || v.type == T::kDict;
  } else if (t == "even" || t == "odd") {
    r = v.type == T::kInt && (v.i % 2 == 0) == (t == "even");
  } else {
    return Error(e.pos, "unsupported test '" + t + "'");
  }
  return Value::Bool(e.op == "not" ? !r : r);
}

}  // namespace

StatusOr<std::string> RenderTemplate(const TemplateNode& root, const ValueDict& globals) {
  Renderer renderer(globals);
  std::string out;
  JINJA_RETURN_IF_ERROR(renderer.Run(root.body, &out));
  return out;
}

}  // namespace tandem::serve::internal
