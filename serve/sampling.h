// Next-token sampling: greedy, temperature, top-k and top-p (nucleus), on the host over one row of
// f32 logits. Used by the serving engine (serve/engine.h, one row per request and iteration) and
// by `tandem generate` (launch/internal/generate.h).
//
//   SamplerParams p{.temperature = 0.8f, .top_k = 40, .top_p = 0.95f};
//   TANDEM_RETURN_IF_ERROR(ValidateSamplingParams(p));
//   Rng rng(DeriveSeed(seed, 0, "sampling"));
//   TANDEM_ASSIGN_OR_RETURN(int32_t id, SampleToken(logits_row, p, rng));
//
// Order of operations (as HF transformers' warpers): divide the logits by the temperature, keep
// the top_k largest, softmax, keep the smallest prefix of the tokens in descending probability
// whose mass reaches top_p, renormalize, draw. Ties in value are broken towards the lower id, so
// every choice is a pure function of (logits, params, rng position). Sampling consumes exactly
// one Rng word per token; greedy (temperature 0) consumes none.
//
// Thread-safety: pure functions; the Rng is the caller's.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "core/rng.h"
#include "core/status.h"

namespace tandem::serve {

struct SamplerParams {
  float temperature = 0.0f;  // 0: greedy (argmax); > 0: sample from softmax(logits / temperature)
  int64_t top_k = 0;         // keep only the k most likely tokens (0: all)
  float top_p = 1.0f;        // nucleus: keep the most likely tokens holding this mass, (0, 1]
};

// InvalidArgument naming the field unless temperature is finite and >= 0, top_k >= 0 and top_p is
// in (0, 1].
Status ValidateSamplingParams(const SamplerParams& params);

// Index of the largest logit (the lowest such index on ties). Precondition: non-empty.
int32_t Argmax(std::span<const float> logits);

// The distribution SampleToken draws from: per token, its probability after temperature, top-k
// and top-p (0 for excluded tokens); sums to 1. Preconditions (checked): valid params with
// temperature > 0, non-empty logits, none NaN or +inf, at least one finite.
std::vector<double> FilteredProbabilities(std::span<const float> logits,
                                          const SamplerParams& params);

// The next token: Argmax when temperature == 0, else a draw from FilteredProbabilities with one
// rng.Uniform(). InvalidArgument for invalid params, empty logits, a NaN or +inf logit, or every
// logit -inf (a broken model, not a programmer error).
StatusOr<int32_t> SampleToken(std::span<const float> logits, const SamplerParams& params, Rng& rng);

}  // namespace tandem::serve
