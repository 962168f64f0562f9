// `tandem generate`: the sampling helpers (greedy, temperature, top-k, top-p, seeds, bad input)
// and the generation loop end to end on a tiny random model saved to a temporary directory,
// checked against an independent greedy loop over LlamaModel::Logits.
#include "launch/internal/generate.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "model/llama.h"
#include "model/tokenizer.h"
#include "ops/context.h"
#include "peft/adapter_io.h"
#include "peft/adapter_set.h"
#include "peft/lora.h"
#include "serve/sampling.h"
#include "tests/common/testing.h"

namespace tandem::launch {
namespace {

using testing::RandomUniform;
using testing::TempDir;

std::vector<float> RandomLogits(int64_t n, uint64_t seed, float scale = 4.0f) {
  Tensor t = RandomUniform({n}, seed, -scale, scale);
  return std::vector<float>(t.data<float>(), t.data<float>() + n);
}

// Ids sorted by logit, largest first (lower id first on ties).
std::vector<int32_t> ByLogit(const std::vector<float>& logits) {
  std::vector<int32_t> ids(logits.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  return ids;
}

// softmax(logits[ids] / temperature) in f64, scattered back to [n] (0 elsewhere).
std::vector<double> SoftmaxOver(const std::vector<float>& logits, const std::vector<int32_t>& ids,
                                double temperature) {
  std::vector<double> p(logits.size(), 0.0);
  double total = 0.0;
  for (int32_t id : ids) total += std::exp(logits[id] / temperature);
  for (int32_t id : ids) p[id] = std::exp(logits[id] / temperature) / total;
  return p;
}

void ExpectProbsNear(const std::vector<double>& actual, const std::vector<double>& expected,
                     double tol) {
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < actual.size(); ++i) {
    EXPECT_NEAR(actual[i], expected[i], tol * (1.0 + expected[i])) << "token " << i;
  }
}

TEST(Sampling, GreedyPicksArgmaxAndDrawsNothing) {
  for (uint64_t seed = 1; seed <= 5; ++seed) {
    const std::vector<float> logits = RandomLogits(97, seed);
    const int32_t expected = ByLogit(logits)[0];
    Rng rng(seed);
    StatusOr<int32_t> id = SampleToken(logits, SamplingParams{}, rng);
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    EXPECT_EQ(*id, expected);
    EXPECT_EQ(rng.position(), 0u);
    EXPECT_EQ(Argmax(logits), expected);
  }
  const std::vector<float> tied = {0.5f, 2.0f, -1.0f, 2.0f};
  EXPECT_EQ(Argmax(tied), 1);  // the lower id wins a tie
}

TEST(Sampling, TemperatureScalesTheSoftmax) {
  const std::vector<float> logits = RandomLogits(41, 11);
  std::vector<int32_t> all(logits.size());
  std::iota(all.begin(), all.end(), 0);
  for (float t : {0.5f, 1.0f, 2.0f}) {
    SCOPED_TRACE(t);
    ExpectProbsNear(FilteredProbabilities(logits, {.temperature = t}), SoftmaxOver(logits, all, t),
                    1e-12);
  }
}

TEST(Sampling, TopKKeepsTheKLargest) {
  const std::vector<float> logits = RandomLogits(60, 21);
  const SamplingParams p{.temperature = 1.0f, .top_k = 5};
  const std::vector<int32_t> order = ByLogit(logits);
  const std::vector<int32_t> top(order.begin(), order.begin() + 5);
  ExpectProbsNear(FilteredProbabilities(logits, p), SoftmaxOver(logits, top, 1.0), 1e-12);
  Rng rng(3);
  for (int i = 0; i < 2000; ++i) {
    StatusOr<int32_t> id = SampleToken(logits, p, rng);
    ASSERT_TRUE(id.ok());
    ASSERT_NE(std::find(top.begin(), top.end(), *id), top.end()) << "draw " << i << ": " << *id;
  }
  // top_k >= the vocabulary keeps everything.
  std::vector<int32_t> all(logits.size());
  std::iota(all.begin(), all.end(), 0);
  ExpectProbsNear(FilteredProbabilities(logits, {.temperature = 1.0f, .top_k = 60}),
                  SoftmaxOver(logits, all, 1.0), 1e-12);
}

TEST(Sampling, TopPKeepsTheNucleusAndDrawsInProportion) {
  // Probabilities 0.05, 0.4, 0.1, 0.3, 0.15: the smallest set holding 0.75 is {1, 3, 4} (0.85).
  const std::vector<double> p = {0.05, 0.4, 0.1, 0.3, 0.15};
  std::vector<float> logits;
  for (double v : p) logits.push_back(static_cast<float>(std::log(v)) + 3.0f);
  const SamplingParams params{.temperature = 1.0f, .top_p = 0.75f};
  const std::vector<double> expected = {0, 0.4 / 0.85, 0, 0.3 / 0.85, 0.15 / 0.85};
  ExpectProbsNear(FilteredProbabilities(logits, params), expected, 1e-6);
  // With top_k = 2 as well, top-k goes first: {1, 3} hold 0.7 < 0.75, both kept.
  ExpectProbsNear(FilteredProbabilities(logits, {.temperature = 1.0f, .top_k = 2, .top_p = 0.75f}),
                  {0, 0.4 / 0.7, 0, 0.3 / 0.7, 0}, 1e-6);
  // A tiny top_p keeps only the most likely token.
  ExpectProbsNear(FilteredProbabilities(logits, {.temperature = 1.0f, .top_p = 0.01f}),
                  {0, 1, 0, 0, 0}, 1e-12);
  const int kDraws = 20000;
  std::vector<int> counts(p.size(), 0);
  Rng rng(DeriveSeed(5, 0, "sampling"));
  for (int i = 0; i < kDraws; ++i) {
    StatusOr<int32_t> id = SampleToken(logits, params, rng);
    ASSERT_TRUE(id.ok());
    ++counts[*id];
  }
  // Standard deviation of a frequency <= 0.0036 here: 0.015 is over 4 sigma.
  for (size_t i = 0; i < p.size(); ++i) {
    EXPECT_NEAR(static_cast<double>(counts[i]) / kDraws, expected[i], 0.015) << "token " << i;
  }
  EXPECT_EQ(rng.position(), static_cast<uint64_t>(kDraws));  // one word per draw
}

TEST(Sampling, TemperatureTowardsZeroIsGreedy) {
  for (uint64_t seed = 31; seed <= 35; ++seed) {
    const std::vector<float> logits = RandomLogits(128, seed);
    const std::vector<int32_t> order = ByLogit(logits);
    const float gap = logits[order[0]] - logits[order[1]];
    ASSERT_GT(gap, 0.0f);
    // The runner-up has probability below exp(-60): no draw can pick it.
    const SamplingParams p{.temperature = gap / 60.0f};
    Rng rng(seed);
    for (int i = 0; i < 200; ++i) {
      StatusOr<int32_t> id = SampleToken(logits, p, rng);
      ASSERT_TRUE(id.ok());
      ASSERT_EQ(*id, order[0]) << "seed " << seed << " draw " << i;
    }
  }
}

TEST(Sampling, SameSeedSameSequence) {
  const std::vector<float> logits = RandomLogits(50, 41, 1.0f);  // a flat distribution
  const SamplingParams p{.temperature = 1.0f, .top_k = 40, .top_p = 0.95f};
  auto draw = [&](uint64_t seed) {
    Rng rng(seed);
    std::vector<int32_t> ids;
    for (int i = 0; i < 300; ++i) ids.push_back(*SampleToken(logits, p, rng));
    return ids;
  };
  EXPECT_EQ(draw(9), draw(9));
  EXPECT_NE(draw(9), draw(10));
}

TEST(Sampling, RejectsBadParametersAndLogits) {
  Rng rng(0);
  const std::vector<float> logits = {1.0f, 2.0f, 3.0f};
  for (const SamplingParams& p :
       {SamplingParams{.temperature = -0.5f}, SamplingParams{.temperature = NAN},
        SamplingParams{.temperature = INFINITY}, SamplingParams{.top_k = -1},
        SamplingParams{.top_p = 0.0f}, SamplingParams{.top_p = 1.5f},
        SamplingParams{.top_p = NAN}}) {
    EXPECT_EQ(ValidateSamplingParams(p).code(), StatusCode::kInvalidArgument);
    EXPECT_FALSE(SampleToken(logits, p, rng).ok());
  }
  for (float t : {0.0f, 1.0f}) {
    const SamplingParams p{.temperature = t};
    EXPECT_FALSE(SampleToken(std::vector<float>{1.0f, NAN}, p, rng).ok());
    EXPECT_FALSE(SampleToken(std::vector<float>{INFINITY, 0.0f}, p, rng).ok());
    EXPECT_FALSE(SampleToken(std::vector<float>{-INFINITY, -INFINITY}, p, rng).ok());
    EXPECT_FALSE(SampleToken(std::vector<float>{}, p, rng).ok());
  }
  // A -inf logit (a masked token) is never drawn.
  const std::vector<float> masked = {-INFINITY, 0.0f, -INFINITY, 0.1f};
  const SamplingParams p{.temperature = 1.0f};
  for (int i = 0; i < 200; ++i) {
    StatusOr<int32_t> id = SampleToken(masked, p, rng);
    ASSERT_TRUE(id.ok());
    ASSERT_TRUE(*id == 1 || *id == 3) << *id;
  }
}

// ---- end to end ---------------------------------------------------------------------------

constexpr int64_t kByteVocab = 259;  // the byte tokenizer's ids

// Vocabulary padded beyond the byte tokenizer's; a short context so that prompts overflow it.
model::LlamaConfig TinyConfig() {
  model::LlamaConfig c;
  c.vocab_size = 270;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.rope_theta = 100.0;
  c.rms_norm_eps = 1e-5;
  c.max_position_embeddings = 16;
  return c;
}

std::unique_ptr<model::LlamaModel> MakeModel(ops::Context& ctx, const model::LlamaConfig& c) {
  model::ModelOptions o;
  o.trainable = false;
  auto m = std::move(model::LlamaModel::Create(ctx, c, o)).value();
  TANDEM_CHECK_OK(m->InitRandom(/*seed=*/77, /*std=*/0.5f));
  return m;
}

// The reference: greedy over the first kByteVocab logits of the last position, recomputing the
// last max_position_embeddings ids each step.
std::vector<int32_t> ReferenceGreedy(model::LlamaModel& m, std::vector<int32_t> ids, int steps) {
  const int64_t max_len = m.config().max_position_embeddings, V = m.config().vocab_size;
  std::vector<int32_t> out;
  for (int s = 0; s < steps; ++s) {
    const int64_t T = std::min<int64_t>(static_cast<int64_t>(ids.size()), max_len);
    model::Batch b;
    b.tokens = Tensor::Cpu({1, T}, DType::kI32);
    for (int64_t t = 0; t < T; ++t) b.tokens.data<int32_t>()[t] = ids[ids.size() - T + t];
    Tensor logits = std::move(m.Logits(b)).value();  // [1, T, V]
    const float* last = logits.data<float>() + (T - 1) * V;
    const int32_t id = static_cast<int32_t>(std::max_element(last, last + kByteVocab) - last);
    out.push_back(id);
    ids.push_back(id);
  }
  return out;
}

std::vector<int32_t> PromptIds(const std::string& prompt) {
  std::vector<int32_t> ids = {256};  // the byte tokenizer's BOS
  for (unsigned char ch : prompt) ids.push_back(ch);
  return ids;
}

class GenerateEndToEnd : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = MakeModel(*ctx_, TinyConfig());
    TANDEM_CHECK_OK(model_->SaveSafetensors(dir_.Join("model"), DType::kF32));
    options_.model_dir = dir_.Join("model");
    options_.prompt = "The quick brown fox";  // 20 ids with BOS: more than the 16 positions
    options_.max_tokens = 12;
    options_.ignore_eos = true;
  }

  Generation MustGenerate(const GenerateOptions& o) {
    StatusOr<Generation> g = GenerateFromOptions(o);
    TANDEM_CHECK_OK(g);
    return std::move(g).value();
  }

  TempDir dir_;
  std::unique_ptr<ops::Context> ctx_ = ops::Context::Cpu();
  std::unique_ptr<model::LlamaModel> model_;
  GenerateOptions options_;
};

TEST_F(GenerateEndToEnd, GreedyMatchesAReferenceLoop) {
  const Generation g = MustGenerate(options_);
  EXPECT_EQ(g.prompt_ids, PromptIds(options_.prompt));
  EXPECT_EQ(g.ids, ReferenceGreedy(*model_, g.prompt_ids, 12));
  EXPECT_EQ(g.finish, FinishReason::kLength);
  EXPECT_EQ(g.text, model::MakeByteTokenizer()->Decode(g.ids, /*skip_special=*/true));
  StatusOr<std::string> text = RunGenerate(options_);
  ASSERT_TRUE(text.ok()) << text.status().ToString();
  EXPECT_EQ(*text, g.text);
}

TEST_F(GenerateEndToEnd, SamplingIsDeterministicAndStopsAtMaxTokens) {
  GenerateOptions o = options_;
  o.sampling = {.temperature = 1.0f, .top_k = 100, .top_p = 0.95f};
  o.seed = 7;
  for (int64_t max_tokens : {0, 1, 10}) {
    o.max_tokens = max_tokens;
    const Generation a = MustGenerate(o), b = MustGenerate(o);
    ASSERT_EQ(static_cast<int64_t>(a.ids.size()), max_tokens);
    EXPECT_EQ(a.finish, FinishReason::kLength);
    EXPECT_EQ(a.ids, b.ids);
    EXPECT_EQ(a.text, b.text);
    for (int32_t id : a.ids) EXPECT_LT(id, kByteVocab) << "an id the tokenizer cannot decode";
  }
  GenerateOptions other = o;
  other.seed = 8;
  EXPECT_NE(MustGenerate(o).ids, MustGenerate(other).ids);
}

TEST_F(GenerateEndToEnd, StopsAtTheStopStringAndAtEos) {
  const Generation full = MustGenerate(options_);
  ASSERT_GE(full.text.size(), 6u);
  GenerateOptions o = options_;
  o.stop = full.text.substr(3, 2);
  const Generation stopped = MustGenerate(o);
  EXPECT_EQ(stopped.finish, FinishReason::kStop);
  EXPECT_EQ(stopped.text, full.text.substr(0, full.text.find(o.stop)));
  EXPECT_LE(stopped.ids.size(), 5u);

  // The same weights with the 4th greedy token declared EOS in config.json.
  model::LlamaConfig with_eos = TinyConfig();
  const int32_t eos = full.ids[3];
  with_eos.eos_token_id = eos;
  with_eos.eos_token_ids = {eos};
  TANDEM_CHECK_OK(MakeModel(*ctx_, with_eos)->SaveSafetensors(dir_.Join("eos"), DType::kF32));
  o = options_;
  o.model_dir = dir_.Join("eos");
  o.ignore_eos = false;
  const Generation ended = MustGenerate(o);
  EXPECT_EQ(ended.finish, FinishReason::kEos);
  // The byte tokenizer's <eos> (257) ends generation too.
  const size_t first = std::find_if(full.ids.begin(), full.ids.end(),
                                    [&](int32_t id) { return id == eos || id == 257; }) -
                       full.ids.begin();
  EXPECT_EQ(ended.ids, std::vector<int32_t>(full.ids.begin(), full.ids.begin() + first));
}

TEST_F(GenerateEndToEnd, AppliesTheLoraAdapter) {
  peft::LoraConfig lc;
  lc.r = 4;
  lc.alpha = 8.0;
  lc.target_modules = {"all-linear"};
  auto adapter = std::move(peft::LoraAdapter::Create(*ctx_, TinyConfig(), lc)).value();
  for (size_t i = 0; i < adapter->parameters().size(); ++i) {
    TANDEM_CHECK_OK(adapter->SetFromHost(
        i, RandomUniform(adapter->parameters()[i].weight.shape(), 100 + i, -0.5f, 0.5f)));
  }
  TANDEM_CHECK_OK(peft::SaveLoraAdapter(*adapter, dir_.Join("adapter")));
  const std::vector<int32_t> base = ReferenceGreedy(*model_, PromptIds(options_.prompt), 12);
  std::vector<int32_t> adapted;
  {
    peft::AdapterSet set(*ctx_, TinyConfig());
    ASSERT_EQ(*set.Add(std::move(adapter)), 0);
    model_->SetAdapter(&set);
    adapted = ReferenceGreedy(*model_, PromptIds(options_.prompt), 12);
    model_->SetAdapter(nullptr);
  }
  ASSERT_NE(adapted, base) << "the adapter should change the greedy continuation";
  GenerateOptions o = options_;
  o.adapter_dir = dir_.Join("adapter");
  EXPECT_EQ(MustGenerate(o).ids, adapted);
}

TEST_F(GenerateEndToEnd, ReportsBadInput) {
  GenerateOptions o = options_;
  o.model_dir = dir_.Join("missing");
  EXPECT_EQ(GenerateFromOptions(o).status().code(), StatusCode::kNotFound);
  o = options_;
  o.tokenizer = dir_.Join("missing/tokenizer.json");
  EXPECT_EQ(GenerateFromOptions(o).status().code(), StatusCode::kNotFound);
  o = options_;
  o.adapter_dir = dir_.Join("missing");
  EXPECT_FALSE(GenerateFromOptions(o).ok());
  o = options_;
  o.sampling.top_p = 0.0f;
  EXPECT_EQ(GenerateFromOptions(o).status().code(), StatusCode::kInvalidArgument);
  o = options_;
  o.max_tokens = -1;
  EXPECT_EQ(GenerateFromOptions(o).status().code(), StatusCode::kInvalidArgument);
  o = options_;
  o.device = "tpu:0";
  EXPECT_FALSE(GenerateFromOptions(o).ok());
  // The default tokenizer of a directory without tokenizer.json is the byte tokenizer.
  StatusOr<std::unique_ptr<model::Tokenizer>> tok = ResolveTokenizer("", options_.model_dir);
  ASSERT_TRUE(tok.ok());
  EXPECT_EQ((*tok)->kind(), "byte");
}

}  // namespace
}  // namespace tandem::launch
