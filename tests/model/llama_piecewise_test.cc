// LlamaModel's ForwardBackward in pieces (BeginForwardBackward / ContinueForwardBackward /
// FinishForwardBackward, for co-serving): any slicing, with another model's passes on the same
// context between the pieces, gives bitwise ForwardBackward's losses and gradients (with and
// without recompute, with an adapter-free and a tied model), the unit count is 3L + 1, and
// misuse is a clear error.
#include <gtest/gtest.h>

#include <cstring>

#include "model/llama.h"
#include "ops/ops.h"
#include "tests/common/testing.h"

namespace tandem::model {
namespace {

LlamaConfig Config(bool tied) {
  LlamaConfig c;
  c.vocab_size = 37;
  c.hidden_size = 24;
  c.intermediate_size = 40;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 6;
  c.num_key_value_heads = 3;
  c.head_dim = 4;
  c.rope_theta = 100.0;
  c.tie_word_embeddings = tied;
  return c;
}

std::unique_ptr<LlamaModel> Make(ops::Context& ctx, const LlamaConfig& c, ModelOptions o) {
  StatusOr<std::unique_ptr<LlamaModel>> m = LlamaModel::Create(ctx, c, o);
  TANDEM_CHECK_OK(m);
  TANDEM_CHECK_OK((*m)->InitRandom(5, 0.2f));
  return std::move(m).value();
}

Batch MakeBatch(int64_t B, int64_t T, int64_t V, uint64_t seed) {
  Batch b;
  b.tokens = testing::RandomInts({B, T}, seed, static_cast<int32_t>(V));
  b.targets = testing::RandomInts({B, T}, seed + 1, static_cast<int32_t>(V));
  b.targets.data<int32_t>()[2] = ops::kIgnoreIndex;
  return b;
}

bool SameGrads(LlamaModel& a, LlamaModel& b) {
  for (size_t i = 0; i < a.parameters().size(); ++i) {
    const Tensor& x = a.parameters()[i].grad;
    const Tensor& y = b.parameters()[i].grad;
    if (std::memcmp(x.raw_data(), y.raw_data(), x.num_bytes()) != 0) return false;
  }
  return true;
}

TEST(LlamaPiecewiseTest, AnySlicingIsBitwiseForwardBackward) {
  for (bool tied : {false, true}) {
    for (bool recompute : {false, true}) {
      for (int64_t units : {1, 2, 3, 7}) {
        SCOPED_TRACE(StrCat("tied ", tied, " recompute ", recompute, " units ", units));
        const LlamaConfig c = Config(tied);
        auto ctx = ops::Context::Cpu();
        auto whole = Make(*ctx, c, {.recompute = recompute});
        auto pieces = Make(*ctx, c, {.recompute = recompute});
        auto other = Make(*ctx, c, {});  // runs between the pieces
        ASSERT_TRUE(whole->ZeroGrads().ok() && pieces->ZeroGrads().ok());
        for (uint64_t seed : {1, 9}) {
          const Batch batch = MakeBatch(2, 7, c.vocab_size, seed);
          StatusOr<LossSum> want = whole->ForwardBackward(batch, 0.125f);
          ASSERT_TRUE(want.ok());
          ASSERT_TRUE(pieces->BeginForwardBackward(batch, 0.125f).ok());
          int calls = 0;
          for (;;) {
            StatusOr<bool> done = pieces->ContinueForwardBackward(units);
            ASSERT_TRUE(done.ok()) << done.status().ToString();
            ++calls;
            ASSERT_TRUE(other->Loss(MakeBatch(1, 5, c.vocab_size, seed + calls)).ok());
            if (*done) break;
          }
          EXPECT_EQ(calls, (3 * 3 + 1 + units - 1) / units);
          StatusOr<LossSum> got = pieces->FinishForwardBackward();
          ASSERT_TRUE(got.ok()) << got.status().ToString();
          EXPECT_EQ(got->sum, want->sum);
          EXPECT_EQ(got->count, want->count);
          EXPECT_FALSE(pieces->forward_backward_in_progress());
        }
        EXPECT_TRUE(SameGrads(*whole, *pieces));
      }
    }
  }
}

TEST(LlamaPiecewiseTest, MisuseIsAClearError) {
  const LlamaConfig c = Config(false);
  auto ctx = ops::Context::Cpu();
  auto m = Make(*ctx, c, {});
  ASSERT_TRUE(m->ZeroGrads().ok());
  StatusOr<bool> none = m->ContinueForwardBackward(1);
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), StatusCode::kFailedPrecondition);
  const Batch batch = MakeBatch(1, 6, c.vocab_size, 3);
  ASSERT_TRUE(m->BeginForwardBackward(batch, 1.0f).ok());
  ASSERT_TRUE(m->ContinueForwardBackward(2).ok());
  StatusOr<LossSum> early = m->FinishForwardBackward();
  ASSERT_FALSE(early.ok());
  EXPECT_NE(early.status().message().find("not complete"), std::string::npos);
  // A forward-only pass of the same model abandons the one in pieces.
  ASSERT_TRUE(m->Loss(batch).ok());
  EXPECT_FALSE(m->forward_backward_in_progress());
  EXPECT_EQ(m->ContinueForwardBackward(1).status().code(), StatusCode::kFailedPrecondition);
  // A bad batch is refused at Begin and leaves no pass behind.
  Batch bad = batch;
  bad.tokens.data<int32_t>()[0] = 1000;
  EXPECT_FALSE(m->BeginForwardBackward(bad, 1.0f).ok());
  EXPECT_FALSE(m->forward_backward_in_progress());
}

}  // namespace
}  // namespace tandem::model
