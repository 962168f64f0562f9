// LoraConfig validation and target resolution (peft/lora.h).
#include <cmath>
#include <string_view>

#include "peft/lora.h"

namespace tandem::peft {
namespace {

constexpr model::Projection kAllProjections[] = {model::Projection::kQ,    model::Projection::kK,
                                                 model::Projection::kV,    model::Projection::kO,
                                                 model::Projection::kGate, model::Projection::kUp,
                                                 model::Projection::kDown};

// "q" -> "q_proj" etc.; anything else unchanged.
std::string CanonicalEntry(const std::string& entry) {
  static constexpr std::pair<std::string_view, std::string_view> kShort[] = {
      {"q", "q_proj"},       {"k", "k_proj"},   {"v", "v_proj"},      {"o", "o_proj"},
      {"gate", "gate_proj"}, {"up", "up_proj"}, {"down", "down_proj"}};
  for (const auto& [s, full] : kShort) {
    if (entry == s) return std::string(full);
  }
  return entry;
}

// M == key, or M ends with "." + key.
bool SuffixMatch(const std::string& module, const std::string& key) {
  if (module == key) return true;
  return module.size() > key.size() &&
         module.compare(module.size() - key.size(), key.size(), key) == 0 &&
         module[module.size() - key.size() - 1] == '.';
}

// Pattern keys may anchor at the start ("^model.layers.0.self_attn.q_proj": the whole name) and
// end with "$" (implied anyway), as PEFT's documentation shows.
std::string_view PatternBody(const std::string& key, bool* anchored) {
  std::string_view k = key;
  *anchored = !k.empty() && k.front() == '^';
  if (*anchored) k.remove_prefix(1);
  if (!k.empty() && k.back() == '$') k.remove_suffix(1);
  return k;
}

Status CheckNoRegex(const std::string& key, const char* field, bool is_pattern) {
  if (key.empty()) return InvalidArgumentError(StrCat("LoraConfig.", field, ": empty key"));
  bool anchored = false;
  const std::string_view body = is_pattern ? PatternBody(key, &anchored) : std::string_view(key);
  const size_t bad = body.find_first_of("*+?()[]{}|^$\\");
  if (bad == std::string::npos) return Status::Ok();
  return UnimplementedError(StrCat("LoraConfig.", field, ": key '", key, "' uses regex syntax ('",
                                   body[bad], "'); tandem matches module-name suffixes only ",
                                   "(e.g. \"q_proj\" or \"layers.3.self_attn.q_proj\")"));
}

template <typename V>
const V* FirstMatch(const std::vector<std::pair<std::string, V>>& pattern,
                    const std::string& module) {
  for (const auto& [key, value] : pattern) {
    bool anchored = false;
    const std::string body(PatternBody(key, &anchored));
    if (anchored ? module == body : SuffixMatch(module, body)) return &value;
  }
  return nullptr;
}

Status ValidateScalars(const LoraConfig& c) {
  if (c.r <= 0) return InvalidArgumentError(StrCat("LoraConfig.r must be positive, found ", c.r));
  if (!std::isfinite(c.alpha)) {
    return InvalidArgumentError(StrCat("LoraConfig.alpha must be finite, found ", c.alpha));
  }
  if (!(c.dropout >= 0.0 && c.dropout < 1.0)) {
    return InvalidArgumentError(StrCat("LoraConfig.dropout must be in [0, 1), found ", c.dropout));
  }
  if (c.target_modules.empty()) {
    return InvalidArgumentError(
        "LoraConfig.target_modules is empty: name at least one module "
        "(q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj "
        "or all-linear)");
  }
  for (const auto& [key, r] : c.rank_pattern) {
    TANDEM_RETURN_IF_ERROR(CheckNoRegex(key, "rank_pattern", true));
    if (r <= 0) {
      return InvalidArgumentError(
          StrCat("LoraConfig.rank_pattern['", key, "'] must be positive, found ", r));
    }
  }
  for (const auto& [key, alpha] : c.alpha_pattern) {
    TANDEM_RETURN_IF_ERROR(CheckNoRegex(key, "alpha_pattern", true));
    if (!std::isfinite(alpha)) {
      return InvalidArgumentError(
          StrCat("LoraConfig.alpha_pattern['", key, "'] must be finite, found ", alpha));
    }
  }
  return Status::Ok();
}

}  // namespace

std::string ProjectionModuleName(int64_t layer, model::Projection proj) {
  return StrCat("model.layers.", layer, ".", model::ProjectionModule(proj), ".",
                model::ProjectionName(proj));
}

std::pair<int64_t, int64_t> ProjectionShape(const model::LlamaConfig& base,
                                            model::Projection proj) {
  const int64_t C = base.hidden_size, F = base.intermediate_size;
  const int64_t D = base.head_dim > 0 ? base.head_dim : C / base.num_attention_heads;
  const int64_t Hq = base.num_attention_heads;
  const int64_t Hkv = base.num_key_value_heads > 0 ? base.num_key_value_heads : Hq;
  switch (proj) {
    case model::Projection::kQ:
      return {C, Hq * D};
    case model::Projection::kK:
    case model::Projection::kV:
      return {C, Hkv * D};
    case model::Projection::kO:
      return {Hq * D, C};
    case model::Projection::kGate:
    case model::Projection::kUp:
      return {C, F};
    case model::Projection::kDown:
      return {F, C};
  }
  return {0, 0};
}

StatusOr<std::vector<LoraTarget>> ResolveLoraTargets(const LoraConfig& config,
                                                     const model::LlamaConfig& base) {
  TANDEM_RETURN_IF_ERROR(ValidateScalars(config));
  const int64_t L = base.num_hidden_layers;
  std::vector<bool> selected(L * model::kNumProjections, false);
  for (const std::string& raw : config.target_modules) {
    const std::string entry = CanonicalEntry(raw);
    bool matched = false;
    if (entry == "all-linear") {
      selected.assign(selected.size(), true);
      matched = L > 0;
    } else {
      TANDEM_RETURN_IF_ERROR(CheckNoRegex(entry, "target_modules", false));
      for (int64_t l = 0; l < L; ++l) {
        for (model::Projection p : kAllProjections) {
          if (!SuffixMatch(ProjectionModuleName(l, p), entry)) continue;
          selected[l * model::kNumProjections + static_cast<int>(p)] = true;
          matched = true;
        }
      }
    }
    if (!matched) {
      return InvalidArgumentError(
          StrCat("LoraConfig.target_modules: '", raw, "' matches no module of the base model (", L,
                 " layers; known: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, "
                 "their short names q ... down, all-linear, or a suffix such as "
                 "\"layers.0.self_attn.q_proj\")"));
    }
  }
  std::vector<LoraTarget> targets;
  for (int64_t l = 0; l < L; ++l) {
    for (model::Projection p : kAllProjections) {
      if (!selected[l * model::kNumProjections + static_cast<int>(p)]) continue;
      LoraTarget t;
      t.layer = l;
      t.proj = p;
      t.module = ProjectionModuleName(l, p);
      const int64_t* r = FirstMatch(config.rank_pattern, t.module);
      const double* alpha = FirstMatch(config.alpha_pattern, t.module);
      t.rank = r != nullptr ? *r : config.r;
      t.alpha = alpha != nullptr ? *alpha : config.alpha;
      const double denom =
          config.use_rslora ? std::sqrt(static_cast<double>(t.rank)) : static_cast<double>(t.rank);
      t.scale = static_cast<float>(t.alpha / denom);
      std::tie(t.in, t.out) = ProjectionShape(base, p);
      targets.push_back(std::move(t));
    }
  }
  return targets;
}

}  // namespace tandem::peft
