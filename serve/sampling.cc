#include "serve/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace tandem::serve {

Status ValidateSamplingParams(const SamplerParams& params) {
  if (!std::isfinite(params.temperature) || params.temperature < 0.0f) {
    return InvalidArgumentError(StrCat(
        "temperature: expected a finite value >= 0 (0 = greedy), found ", params.temperature));
  }
  if (params.top_k < 0) {
    return InvalidArgumentError(
        StrCat("top_k: expected a value >= 0 (0 = no limit), found ", params.top_k));
  }
  if (!(params.top_p > 0.0f && params.top_p <= 1.0f)) {
    return InvalidArgumentError(
        StrCat("top_p: expected a value in (0, 1] (1 = no limit), found ", params.top_p));
  }
  return Status::Ok();
}

int32_t Argmax(std::span<const float> logits) {
  TANDEM_CHECK(!logits.empty());
  size_t best = 0;
  for (size_t i = 1; i < logits.size(); ++i) {
    if (logits[i] > logits[best]) best = i;
  }
  return static_cast<int32_t>(best);
}

std::vector<double> FilteredProbabilities(std::span<const float> logits,
                                          const SamplerParams& params) {
  TANDEM_CHECK_OK(ValidateSamplingParams(params));
  TANDEM_CHECK(params.temperature > 0.0f);
  TANDEM_CHECK(!logits.empty());
  const int64_t n = static_cast<int64_t>(logits.size());
  // Candidate ids; sorted by (logit descending, id ascending) whenever a filter needs the order.
  std::vector<int32_t> kept(n);
  std::iota(kept.begin(), kept.end(), 0);
  int64_t keep = n;
  if (params.top_k > 0 && params.top_k < n) keep = params.top_k;
  if (keep < n || params.top_p < 1.0f) {
    auto before = [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    };
    std::partial_sort(kept.begin(), kept.begin() + keep, kept.end(), before);
    kept.resize(keep);
  }
  float max_logit = -INFINITY;
  for (int32_t id : kept) {
    TANDEM_CHECK_MSG(!std::isnan(logits[id]) && logits[id] != INFINITY, "logit ", id, " is ",
                     logits[id]);
    max_logit = std::max(max_logit, logits[id]);
  }
  TANDEM_CHECK_MSG(std::isfinite(max_logit), "every candidate logit is -inf");
  std::vector<double> weight(kept.size());  // in `kept` order
  double total = 0.0;
  for (size_t i = 0; i < kept.size(); ++i) {
    weight[i] = std::exp((static_cast<double>(logits[kept[i]]) - max_logit) / params.temperature);
    total += weight[i];
  }
  if (params.top_p < 1.0f) {  // `kept` is in descending probability: cut after the nucleus
    double mass = 0.0;
    size_t cut = kept.size();
    for (size_t i = 0; i < kept.size(); ++i) {
      mass += weight[i] / total;
      if (mass >= params.top_p) {
        cut = i + 1;
        break;
      }
    }
    kept.resize(cut);
    weight.resize(cut);
    total = std::accumulate(weight.begin(), weight.end(), 0.0);
  }
  std::vector<double> probs(n, 0.0);
  for (size_t i = 0; i < kept.size(); ++i) probs[kept[i]] = weight[i] / total;
  return probs;
}

StatusOr<int32_t> SampleToken(std::span<const float> logits, const SamplerParams& params,
                              Rng& rng) {
  TANDEM_RETURN_IF_ERROR(ValidateSamplingParams(params));
  if (logits.empty()) return InvalidArgumentError("sampling: the logits row is empty");
  bool any_finite = false;
  for (size_t i = 0; i < logits.size(); ++i) {
    if (std::isnan(logits[i]) || logits[i] == INFINITY) {
      return InvalidArgumentError(StrCat("sampling: expected finite logits, found ", logits[i],
                                         " at token id ", i, " (of ", logits.size(), ")"));
    }
    any_finite = any_finite || std::isfinite(logits[i]);
  }
  if (!any_finite) {
    return InvalidArgumentError(StrCat("sampling: all ", logits.size(), " logits are -inf"));
  }
  if (params.temperature == 0.0f) return Argmax(logits);
  const std::vector<double> probs = FilteredProbabilities(logits, params);
  const double u = rng.Uniform();  // [0, 1)
  double mass = 0.0;
  int32_t last = -1;
  for (size_t i = 0; i < probs.size(); ++i) {
    if (probs[i] == 0.0) continue;
    last = static_cast<int32_t>(i);
    mass += probs[i];
    if (u < mass) return last;
  }
  return last;  // u beyond the rounded total mass: the last candidate
}

}  // namespace tandem::serve
