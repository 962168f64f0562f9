// S²FT configuration, selection of heads and channels, and the blocks they train (peft/s2ft.h).
#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/rng.h"
#include "peft/internal/s2ft_weights.h"
#include "peft/lora.h"
#include "peft/s2ft.h"

namespace tandem::peft {
namespace {

using internal::DimsOf;
using internal::S2ftDims;

// The first n of a Fisher-Yates shuffle of [0, count), ascending.
std::vector<int64_t> RandomPick(int64_t count, int64_t n, uint64_t key, uint64_t stream) {
  std::vector<int64_t> items(count);
  std::iota(items.begin(), items.end(), 0);
  Rng rng(key, stream);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = i + rng.UniformInt(static_cast<uint32_t>(count - i));
    std::swap(items[i], items[j]);
  }
  items.resize(n);
  std::sort(items.begin(), items.end());
  return items;
}

// The n largest scores (ties to the lower index), ascending by index.
std::vector<int64_t> TopPick(const std::vector<double>& score, int64_t n) {
  std::vector<int64_t> items(score.size());
  std::iota(items.begin(), items.end(), 0);
  std::stable_sort(items.begin(), items.end(),
                   [&](int64_t a, int64_t b) { return score[a] > score[b]; });
  items.resize(n);
  std::sort(items.begin(), items.end());
  return items;
}

// Per-layer counts of kv groups and channels (see the header).
std::pair<int64_t, int64_t> Counts(const S2ftConfig& c, const model::LlamaConfig& base) {
  const S2ftDims d = DimsOf(base);
  const int64_t fg = std::llround(c.heads_fraction * static_cast<double>(d.Hkv));
  const int64_t fc = std::llround(c.ffn_fraction * static_cast<double>(d.F));
  if (c.budget <= 0) return {std::clamp<int64_t>(fg, 0, d.Hkv), std::clamp<int64_t>(fc, 0, d.F)};
  const double group_cost = static_cast<double>(S2ftParamsPerGroup(base, c.coupled));
  const double channel_cost = static_cast<double>(S2ftParamsPerChannel(base, c.coupled));
  const double b = static_cast<double>(c.budget / d.L);
  const double a = c.heads_fraction * d.Hkv * group_cost, f = c.ffn_fraction * d.F * channel_cost;
  const double share = a + f > 0 ? b * a / (a + f) : 0.0;
  int64_t groups = std::min<int64_t>(d.Hkv, static_cast<int64_t>(share / group_cost));
  double left = b - static_cast<double>(groups) * group_cost;
  const int64_t channels = std::min<int64_t>(d.F, static_cast<int64_t>(left / channel_cost));
  left -= static_cast<double>(channels) * channel_cost;  // all channels taken: more groups
  groups = std::min<int64_t>(d.Hkv, groups + static_cast<int64_t>(left / group_cost));
  return {groups, channels};
}

// Squared norms of column units of a host f32 [R, cols] matrix (`unit` columns per score).
std::vector<double> ColumnScores(const Tensor& w, int64_t unit) {
  const int64_t rows = w.dim(0), cols = w.dim(1);
  std::vector<double> score(cols / unit, 0.0);
  const float* p = w.data<float>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      score[c / unit] += static_cast<double>(p[r * cols + c]) * p[r * cols + c];
    }
  }
  return score;
}

Status CheckList(std::vector<int64_t>& list, int64_t bound, const std::string& what) {
  std::sort(list.begin(), list.end());
  for (size_t i = 0; i < list.size(); ++i) {
    if (list[i] < 0 || list[i] >= bound) {
      return OutOfRangeError(StrCat(what, ": index ", list[i], " is outside [0, ", bound, ")"));
    }
    if (i > 0 && list[i] == list[i - 1]) {
      return InvalidArgumentError(StrCat(what, ": duplicate index ", list[i]));
    }
  }
  return Status::Ok();
}

S2ftBlock MakeBlock(int64_t layer, model::Projection proj, S2ftAxis axis,
                    std::vector<int64_t> indices, int64_t other) {
  S2ftBlock b;
  b.layer = layer;
  b.proj = proj;
  b.axis = axis;
  const int64_t s = static_cast<int64_t>(indices.size());
  b.indices = std::move(indices);
  b.shape = axis == S2ftAxis::kColumns ? Shape{other, s} : Shape{s, other};
  b.name = ProjectionModuleName(layer, proj) + ".s2ft_delta";
  return b;
}

// Units of `size` rows/columns each: u * size + i.
std::vector<int64_t> Expand(const std::vector<int64_t>& units, int64_t size) {
  std::vector<int64_t> out;
  for (int64_t u : units) {
    for (int64_t i = 0; i < size; ++i) out.push_back(u * size + i);
  }
  return out;
}

}  // namespace

const char* S2ftAxisName(S2ftAxis axis) { return axis == S2ftAxis::kColumns ? "columns" : "rows"; }

int64_t S2ftParamsPerGroup(const model::LlamaConfig& base, bool coupled) {
  const S2ftDims d = DimsOf(base);
  // o columns of g heads; coupled: q rows of g heads, k and v rows of one kv head.
  return d.C * d.g * d.D * (coupled ? 2 : 1) + (coupled ? 2 * d.D * d.C : 0);
}

int64_t S2ftParamsPerChannel(const model::LlamaConfig& base, bool coupled) {
  return base.hidden_size * (coupled ? 3 : 1);  // down column; coupled: gate and up rows
}

Status ValidateS2ftConfig(const S2ftConfig& c) {
  for (auto [name, v] : {std::pair<const char*, double>{"heads_fraction", c.heads_fraction},
                         std::pair<const char*, double>{"ffn_fraction", c.ffn_fraction}}) {
    if (!(v >= 0.0 && v <= 1.0)) {
      return InvalidArgumentError(StrCat("S2ftConfig.", name, " must be in [0, 1], found ", v));
    }
  }
  if (c.budget < 0) {
    return InvalidArgumentError(StrCat("S2ftConfig.budget must be >= 0, found ", c.budget));
  }
  if (c.selection != "random" && c.selection != "weight") {
    return InvalidArgumentError(StrCat("S2ftConfig.selection must be \"random\" or \"weight\", ",
                                       "found \"", c.selection, "\""));
  }
  return Status::Ok();
}

StatusOr<S2ftSelection> SelectS2ft(ops::Context& ctx, const S2ftConfig& config,
                                   model::LlamaModel& base) {
  TANDEM_RETURN_IF_ERROR(ValidateS2ftConfig(config));
  const model::LlamaConfig& mc = base.config();
  const S2ftDims d = DimsOf(mc);
  const auto [groups, channels] = Counts(config, mc);
  if (groups == 0 && channels == 0) {
    return InvalidArgumentError(StrCat("S2FT selects nothing: heads_fraction ",
                                       config.heads_fraction, " of ", d.Hkv, " kv groups, ",
                                       "ffn_fraction ", config.ffn_fraction, " of ", d.F,
                                       " channels, budget ", config.budget));
  }
  S2ftSelection sel;
  sel.layers.resize(d.L);
  const uint64_t key = DeriveSeed(config.seed, 0, "s2ft_select");
  for (int64_t l = 0; l < d.L; ++l) {
    std::vector<int64_t> picked_groups, picked_channels;
    if (config.selection == "random") {
      picked_groups = RandomPick(d.Hkv, groups, key, 2 * l);
      picked_channels = RandomPick(d.F, channels, key, 2 * l + 1);
    } else {
      TANDEM_ASSIGN_OR_RETURN(model::Parameter * o,
                              internal::FindProjectionWeight(base, l, model::Projection::kO));
      TANDEM_ASSIGN_OR_RETURN(model::Parameter * down,
                              internal::FindProjectionWeight(base, l, model::Projection::kDown));
      TANDEM_ASSIGN_OR_RETURN(const Tensor wo, internal::ReadWeightF32(ctx, *o));     // [C, Hq D]
      TANDEM_ASSIGN_OR_RETURN(const Tensor wd, internal::ReadWeightF32(ctx, *down));  // [C, F]
      picked_groups = TopPick(ColumnScores(wo, d.g * d.D), groups);
      picked_channels = TopPick(ColumnScores(wd, 1), channels);
    }
    sel.layers[l].heads = Expand(picked_groups, d.g);
    sel.layers[l].channels = std::move(picked_channels);
  }
  return sel;
}

Status NormalizeS2ftSelection(S2ftSelection& selection, const model::LlamaConfig& base,
                              const std::string& source) {
  const S2ftDims d = DimsOf(base);
  if (static_cast<int64_t>(selection.layers.size()) != d.L) {
    return InvalidArgumentError(StrCat(source, ": the selection has ", selection.layers.size(),
                                       " layers, the base model ", d.L));
  }
  for (int64_t l = 0; l < d.L; ++l) {
    S2ftLayerSelection& s = selection.layers[l];
    TANDEM_RETURN_IF_ERROR(CheckList(s.heads, d.Hq, StrCat(source, ": layer ", l, " heads")));
    TANDEM_RETURN_IF_ERROR(CheckList(s.channels, d.F, StrCat(source, ": layer ", l, " channels")));
    for (size_t i = 0; i < s.heads.size(); i += d.g) {
      const int64_t group = s.heads[i] / d.g;
      for (int64_t k = 0; k < d.g; ++k) {
        if (i + k < s.heads.size() && s.heads[i + k] == group * d.g + k) continue;
        return InvalidArgumentError(
            StrCat(source, ": layer ", l, " heads must be whole kv groups of ", d.g,
                   " query heads (heads ", group * d.g, "..", group * d.g + d.g - 1,
                   " share kv head ", group, "); head ", s.heads[i], " comes without the rest"));
      }
    }
  }
  return Status::Ok();
}

std::vector<S2ftBlock> S2ftBlocksFor(const S2ftSelection& selection, const model::LlamaConfig& base,
                                     bool coupled) {
  using model::Projection;
  const S2ftDims d = DimsOf(base);
  std::vector<S2ftBlock> blocks;
  for (int64_t l = 0; l < static_cast<int64_t>(selection.layers.size()); ++l) {
    const S2ftLayerSelection& s = selection.layers[l];
    const std::vector<int64_t> head_dims = Expand(s.heads, d.D);
    std::vector<int64_t> groups;
    for (size_t i = 0; i < s.heads.size(); i += d.g) groups.push_back(s.heads[i] / d.g);
    const std::vector<int64_t> group_dims = Expand(groups, d.D);
    if (!s.heads.empty()) {
      if (coupled) {
        blocks.push_back(MakeBlock(l, Projection::kQ, S2ftAxis::kRows, head_dims, d.C));
        blocks.push_back(MakeBlock(l, Projection::kK, S2ftAxis::kRows, group_dims, d.C));
        blocks.push_back(MakeBlock(l, Projection::kV, S2ftAxis::kRows, group_dims, d.C));
      }
      blocks.push_back(MakeBlock(l, Projection::kO, S2ftAxis::kColumns, head_dims, d.C));
    }
    if (!s.channels.empty()) {
      if (coupled) {
        blocks.push_back(MakeBlock(l, Projection::kGate, S2ftAxis::kRows, s.channels, d.C));
        blocks.push_back(MakeBlock(l, Projection::kUp, S2ftAxis::kRows, s.channels, d.C));
      }
      blocks.push_back(MakeBlock(l, Projection::kDown, S2ftAxis::kColumns, s.channels, d.C));
    }
  }
  return blocks;
}

}  // namespace tandem::peft
