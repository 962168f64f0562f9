// Jinja parsing: pieces and tokens (jinja_lex.h) -> a tree of TemplateNodes.
#include <cctype>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "serve/internal/jinja.h"
#include "serve/internal/jinja_lex.h"

namespace tandem::serve::internal {
namespace {

// Recursive descent over one tag's tokens, in Jinja2's precedence order. Failures set error_
// and return null; every caller passes null straight up.
class ExprParser {
 public:
  ExprParser(std::vector<Tok> toks, const std::string& src) : t_(std::move(toks)), src_(src) {}

  const Tok& Peek(size_t ahead = 0) const { return t_[std::min(i_ + ahead, t_.size() - 1)]; }
  bool IsOp(const char* op) const { return Peek().kind == Tok::Kind::kOp && Peek().s == op; }
  bool IsName(const char* n, size_t ahead = 0) const {
    return Peek(ahead).kind == Tok::Kind::kName && Peek(ahead).s == n;
  }
  bool AtEnd() const { return Peek().kind == Tok::Kind::kEnd; }
  bool Accept(const char* op) {
    if (!IsOp(op)) return false;
    ++i_;
    return true;
  }
  bool AcceptName(const char* n) {
    if (!IsName(n)) return false;
    ++i_;
    return true;
  }
  std::nullptr_t Fail(const std::string& what) {
    if (error_.ok()) {
      error_ = InvalidArgumentError(StrCat(what, " at ", Where(src_, Peek().pos), ", found '",
                                           AtEnd() ? "end of tag" : Peek().s, "'"));
    }
    return nullptr;
  }
  bool Expect(const char* op) { return Accept(op) || (Fail(StrCat("expected '", op, "'")), false); }
  std::optional<std::string> Name() {
    if (Peek().kind != Tok::Kind::kName) return Fail("expected a name"), std::nullopt;
    return t_[i_++].s;
  }
  const Status& error() const { return error_; }

  ExprPtr Expression();

 private:
  static ExprPtr Make(Expr::Kind kind, size_t pos, std::vector<ExprPtr> args, std::string op = "",
                      std::string name = "") {
    auto e = std::make_shared<Expr>();
    e->kind = kind;
    e->pos = pos;
    e->args = std::move(args);
    e->op = std::move(op);
    e->name = std::move(name);
    return e;
  }
  ExprPtr Or();
  ExprPtr And();
  ExprPtr Not();
  ExprPtr Compare();
  ExprPtr Math1();
  ExprPtr Concat();
  ExprPtr Math2();
  ExprPtr Unary();
  ExprPtr Primary();
  ExprPtr Postfix(ExprPtr e);
  ExprPtr FilterAndTest(ExprPtr e);
  bool CallArgs(Expr* call);

  std::vector<Tok> t_;
  size_t i_ = 0;
  const std::string& src_;
  Status error_;
};

ExprPtr ExprParser::Expression() {
  ExprPtr e = Or();
  while (e && IsName("if")) {
    const size_t pos = Peek().pos;
    ++i_;
    ExprPtr cond = Or();
    if (!cond) return nullptr;
    ExprPtr other = Make(Expr::Kind::kLiteral, pos, {});  // undefined when no else
    if (AcceptName("else") && !(other = Expression())) return nullptr;
    e = Make(Expr::Kind::kCond, pos, {cond, e, other});
  }
  return e;
}

ExprPtr ExprParser::Or() {
  ExprPtr e = And();
  while (e && IsName("or")) {
    const size_t pos = Peek().pos;
    ++i_;
    ExprPtr r = And();
    if (!r) return nullptr;
    e = Make(Expr::Kind::kBinary, pos, {e, r}, "or");
  }
  return e;
}

ExprPtr ExprParser::And() {
  ExprPtr e = Not();
  while (e && IsName("and")) {
    const size_t pos = Peek().pos;
    ++i_;
    ExprPtr r = Not();
    if (!r) return nullptr;
    e = Make(Expr::Kind::kBinary, pos, {e, r}, "and");
  }
  return e;
}

ExprPtr ExprParser::Not() {
  if (IsName("not")) {
    const size_t pos = Peek().pos;
    ++i_;
    ExprPtr e = Not();
    return e ? Make(Expr::Kind::kUnary, pos, {e}, "not") : nullptr;
  }
  return Compare();
}

ExprPtr ExprParser::Compare() {
  ExprPtr e = Math1();
  while (e) {
    const size_t pos = Peek().pos;
    std::string op;
    for (const char* c : {"==", "!=", "<", ">", "<=", ">="}) {
      if (IsOp(c)) op = c;
    }
    if (!op.empty()) {
      ++i_;
    } else if (IsName("in")) {
      op = "in";
      ++i_;
    } else if (IsName("not") && IsName("in", 1)) {
      op = "not in";
      i_ += 2;
    } else {
      break;
    }
    ExprPtr r = Math1();
    if (!r) return nullptr;
    e = Make(Expr::Kind::kBinary, pos, {e, r}, op);
  }
  return e;
}

ExprPtr ExprParser::Math1() {
  ExprPtr e = Concat();
  while (e && (IsOp("+") || IsOp("-"))) {
    const Tok op = t_[i_++];
    ExprPtr r = Concat();
    if (!r) return nullptr;
    e = Make(Expr::Kind::kBinary, op.pos, {e, r}, op.s);
  }
  return e;
}

ExprPtr ExprParser::Concat() {
  ExprPtr e = Math2();
  while (e && IsOp("~")) {
    const size_t pos = t_[i_++].pos;
    ExprPtr r = Math2();
    if (!r) return nullptr;
    e = Make(Expr::Kind::kBinary, pos, {e, r}, "~");
  }
  return e;
}

ExprPtr ExprParser::Math2() {
  ExprPtr e = Unary();
  while (e && (IsOp("*") || IsOp("//") || IsOp("%") || IsOp("/"))) {
    const Tok op = t_[i_++];
    ExprPtr r = Unary();
    if (!r) return nullptr;
    e = Make(Expr::Kind::kBinary, op.pos, {e, r}, op.s == "/" ? "//" : op.s);
  }
  return e;
}

ExprPtr ExprParser::Unary() {
  if (IsOp("-")) {
    const size_t pos = t_[i_++].pos;
    ExprPtr e = Unary();
    return e ? Make(Expr::Kind::kUnary, pos, {e}, "-") : nullptr;
  }
  ExprPtr e = Primary();
  if (e) e = Postfix(e);
  return e ? FilterAndTest(e) : nullptr;
}

ExprPtr ExprParser::Primary() {
  const Tok& t = Peek();
  auto lit = [&](Value v) {
    auto e = std::make_shared<Expr>();
    e->kind = Expr::Kind::kLiteral;
    e->value = std::move(v);
    e->pos = t.pos;
    ++i_;
    return e;
  };
  if (t.kind == Tok::Kind::kString) {  // adjacent literals concatenate, as in Python
    auto e = std::make_shared<Expr>();
    e->pos = t.pos;
    std::string s;
    while (Peek().kind == Tok::Kind::kString) s += t_[i_++].s;
    e->value = Value::Str(std::move(s));
    return e;
  }
  if (t.kind == Tok::Kind::kInt) return lit(Value::Int(t.i));
  if (t.kind == Tok::Kind::kName) {
    if (t.s == "true" || t.s == "True") return lit(Value::Bool(true));
    if (t.s == "false" || t.s == "False") return lit(Value::Bool(false));
    if (t.s == "none" || t.s == "None") return lit(Value::None());
    ++i_;
    return Make(Expr::Kind::kName, t.pos, {}, "", t.s);
  }
  const size_t pos = t.pos;
  if (Accept("(")) {
    ExprPtr e = Expression();
    return e && Expect(")") ? e : nullptr;
  }
  if (Accept("[")) {
    std::vector<ExprPtr> items;
    while (!Accept("]")) {
      if (!items.empty() && !Expect(",")) return nullptr;
      if (Accept("]")) break;
      ExprPtr e = Expression();
      if (!e) return nullptr;
      items.push_back(e);
    }
    return Make(Expr::Kind::kList, pos, std::move(items));
  }
  if (Accept("{")) {
    auto d = std::make_shared<Expr>();
    d->kind = Expr::Kind::kDict;
    d->pos = pos;
    while (!Accept("}")) {
      if (!d->args.empty() && !Expect(",")) return nullptr;
      if (Peek().kind != Tok::Kind::kString) return Fail("expected a string key");
      d->keys.push_back(t_[i_++].s);
      ExprPtr v;
      if (!Expect(":") || !(v = Expression())) return nullptr;
      d->args.push_back(v);
    }
    return d;
  }
  return Fail("expected an expression");
}

bool ExprParser::CallArgs(Expr* call) {
  while (!Accept(")")) {
    if (call->args.size() > 1 && !Expect(",")) return false;
    std::string key;
    if (Peek().kind == Tok::Kind::kName && Peek(1).kind == Tok::Kind::kOp && Peek(1).s == "=") {
      key = Peek().s;
      i_ += 2;
    }
    ExprPtr a = Expression();
    if (!a) return false;
    call->args.push_back(a);
    call->keys.push_back(key);
  }
  return true;
}

ExprPtr ExprParser::Postfix(ExprPtr e) {
  while (true) {
    const size_t pos = Peek().pos;
    if (Accept(".")) {
      std::optional<std::string> n = Name();
      if (!n) return nullptr;
      e = Make(Expr::Kind::kAttr, pos, {e}, "", *n);
    } else if (Accept("[")) {
      ExprPtr lo, hi;
      if (!IsOp(":") && !(lo = Expression())) return nullptr;
      if (Accept(":")) {
        if (!IsOp("]") && !(hi = Expression())) return nullptr;
        if (!Expect("]")) return nullptr;
        e = Make(Expr::Kind::kSlice, pos, {e, lo, hi});
      } else {
        if (!Expect("]")) return nullptr;
        e = Make(Expr::Kind::kIndex, pos, {e, lo});
      }
    } else if (Accept("(")) {
      auto call = std::make_shared<Expr>();
      call->kind = Expr::Kind::kCall;
      call->pos = pos;
      call->args.push_back(e);
      if (!CallArgs(call.get())) return nullptr;
      e = call;
    } else {
      return e;
    }
  }
}

ExprPtr ExprParser::FilterAndTest(ExprPtr e) {
  while (true) {
    const size_t pos = Peek().pos;
    if (Accept("|")) {
      std::optional<std::string> n = Name();
      if (!n) return nullptr;
      auto f = std::make_shared<Expr>();
      f->kind = Expr::Kind::kFilter;
      f->pos = pos;
      f->name = *n;
      f->args.push_back(e);
      if (Accept("(") && !CallArgs(f.get())) return nullptr;
      e = Postfix(f);
      if (!e) return nullptr;
    } else if (AcceptName("is")) {
      const bool negated = AcceptName("not");
      std::optional<std::string> n = Name();
      if (!n) return nullptr;
      e = Make(Expr::Kind::kTest, pos, {e}, negated ? "not" : "", *n);
    } else {
      return e;
    }
  }
}

using Nodes = std::vector<NodePtr>;

// Parses pieces[*i...] into `out` until a statement whose keyword is in `stops`; returns that
// keyword ("" at the end of the template) and leaves *i on that statement.
class TreeBuilder {
 public:
  TreeBuilder(const std::vector<Piece>& pieces, const std::string& src) : p_(pieces), src_(src) {}

  StatusOr<std::string> Block(std::initializer_list<const char*> stops, Nodes* out);

 private:
  StatusOr<ExprPtr> ParseExpr(ExprParser& parser) {
    ExprPtr e = parser.Expression();
    if (!e) return parser.error();
    if (!parser.AtEnd()) {
      parser.Fail("unexpected text after the expression");
      return parser.error();
    }
    return e;
  }
  StatusOr<NodePtr> If(ExprParser& parser, size_t pos);
  StatusOr<NodePtr> For(ExprParser& parser, size_t pos);
  StatusOr<NodePtr> Set(ExprParser& parser, size_t pos);

  const std::vector<Piece>& p_;
  const std::string& src_;
  size_t i_ = 0;
};

StatusOr<std::string> TreeBuilder::Block(std::initializer_list<const char*> stops, Nodes* out) {
  for (; i_ < p_.size(); ++i_) {
    const Piece& piece = p_[i_];
    auto node = std::make_shared<TemplateNode>();
    node->pos = piece.pos;
    if (piece.kind == Piece::Kind::kText) {
      node->kind = TemplateNode::Kind::kText;
      node->text = piece.s;
      out->push_back(node);
      continue;
    }
    TANDEM_ASSIGN_OR_RETURN(std::vector<Tok> toks, Tokenize(piece.s, piece.pos, src_));
    ExprParser parser(std::move(toks), src_);
    if (piece.kind == Piece::Kind::kExpr) {
      node->kind = TemplateNode::Kind::kOutput;
      TANDEM_ASSIGN_OR_RETURN(node->expr, ParseExpr(parser));
      out->push_back(node);
      continue;
    }
    std::optional<std::string> keyword = parser.Name();
    if (!keyword) return parser.error();
    for (const char* stop : stops) {
      if (*keyword == stop) return *keyword;
    }
    NodePtr made;
    if (*keyword == "if") {
      TANDEM_ASSIGN_OR_RETURN(made, If(parser, piece.pos));
    } else if (*keyword == "for") {
      TANDEM_ASSIGN_OR_RETURN(made, For(parser, piece.pos));
    } else if (*keyword == "set") {
      TANDEM_ASSIGN_OR_RETURN(made, Set(parser, piece.pos));
    } else if (*keyword == "generation" || *keyword == "endgeneration") {
      continue;  // HF's assistant-mask markers: no output
    } else {
      return InvalidArgumentError(StrCat("unsupported or unexpected statement '", *keyword, "' at ",
                                         Where(src_, piece.pos)));
    }
    out->push_back(made);
  }
  return std::string();
}

StatusOr<NodePtr> TreeBuilder::If(ExprParser& parser, size_t pos) {
  auto node = std::make_shared<TemplateNode>();
  node->kind = TemplateNode::Kind::kIf;
  node->pos = pos;
  TANDEM_ASSIGN_OR_RETURN(ExprPtr cond, ParseExpr(parser));
  while (true) {
    ++i_;
    Nodes body;
    TANDEM_ASSIGN_OR_RETURN(std::string stop, Block({"elif", "else", "endif"}, &body));
    node->conditions.push_back(cond);
    node->branches.push_back(std::move(body));
    if (stop.empty()) return InvalidArgumentError("'if' without 'endif' at " + Where(src_, pos));
    if (stop == "endif") return NodePtr(node);
    TANDEM_ASSIGN_OR_RETURN(std::vector<Tok> toks, Tokenize(p_[i_].s, p_[i_].pos, src_));
    ExprParser branch(std::move(toks), src_);
    (void)branch.Name();
    if (stop == "else") {
      cond = nullptr;
    } else {
      TANDEM_ASSIGN_OR_RETURN(cond, ParseExpr(branch));
    }
  }
}

StatusOr<NodePtr> TreeBuilder::For(ExprParser& parser, size_t pos) {
  auto node = std::make_shared<TemplateNode>();
  node->kind = TemplateNode::Kind::kFor;
  node->pos = pos;
  std::optional<std::string> target = parser.Name();
  std::vector<std::string> names;
  while (target && parser.Accept(",")) {
    if (names.empty()) names.push_back(*target);
    std::optional<std::string> next = parser.Name();
    if (!next) return parser.error();
    names.push_back(*next);
  }
  if (!target || !parser.AcceptName("in")) {
    return InvalidArgumentError("expected 'for NAME[, NAME...] in EXPR' at " + Where(src_, pos));
  }
  node->target = names.empty() ? *target : "";
  node->unpack = std::move(names);
  TANDEM_ASSIGN_OR_RETURN(node->expr, ParseExpr(parser));
  ++i_;
  TANDEM_ASSIGN_OR_RETURN(std::string stop, Block({"endfor"}, &node->body));
  if (stop.empty()) return InvalidArgumentError("'for' without 'endfor' at " + Where(src_, pos));
  return NodePtr(node);
}

StatusOr<NodePtr> TreeBuilder::Set(ExprParser& parser, size_t pos) {
  auto node = std::make_shared<TemplateNode>();
  node->kind = TemplateNode::Kind::kSet;
  node->pos = pos;
  std::optional<std::string> name = parser.Name();
  if (!name) return parser.error();
  node->target = *name;
  if (parser.Accept(".")) {
    std::optional<std::string> attr = parser.Name();
    if (!attr) return parser.error();
    node->attr = *attr;
  }
  if (!parser.Expect("=")) return parser.error();
  TANDEM_ASSIGN_OR_RETURN(node->expr, ParseExpr(parser));
  return NodePtr(node);
}

}  // namespace

StatusOr<NodePtr> ParseTemplate(const std::string& source) {
  TANDEM_ASSIGN_OR_RETURN(std::vector<Piece> pieces, Scan(source));
  auto root = std::make_shared<TemplateNode>();
  root->kind = TemplateNode::Kind::kRoot;
  TreeBuilder builder(pieces, source);
  TANDEM_ASSIGN_OR_RETURN(std::string stop,
                          builder.Block({"endif", "endfor", "elif", "else"}, &root->body));
  if (!stop.empty()) {
    return InvalidArgumentError(StrCat("'", stop, "' without a matching opening statement"));
  }
  return NodePtr(root);
}

}  // namespace tandem::serve::internal
