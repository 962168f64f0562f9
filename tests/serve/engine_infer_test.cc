// InferModel (paged KV cache, chunked prefill, multi-adapter LoRA) equals LlamaModel::Logits on
// the CPU (f32): see engine_infer_parity.h. AdapterWeights' fused q|k|v and gate|up sites equal
// the sum of their projections' deltas.
#include <cmath>

#include "tests/serve/engine_infer_parity.h"

namespace tandem::serve {
namespace {

TEST(InferModel, MatchesLlamaLogitsOnCpu) {
  auto ctx = ops::Context::Cpu();
  RunInferParity(*ctx, 32, {1e-4, 1e-4});
}

TEST(InferModel, FusedLoraSitesMatchLlamaLogitsOnCpu) {
  auto ctx = ops::Context::Cpu();
  RunInferParity(*ctx, 32, {1e-4, 1e-4}, FusedParitySpecs());
}

// y [n, out] = scale * (x A^T) B^T in double; x [n, in], A [r, in], B [out, r] (host f32).
std::vector<double> Delta(const Tensor& x, const Tensor& a, const Tensor& b, double scale) {
  const int64_t n = x.dim(0), in = x.dim(1), r = a.dim(0), out = b.dim(0);
  std::vector<double> h(n * r, 0.0), y(n * out, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < r; ++j) {
      for (int64_t c = 0; c < in; ++c) {
        h[i * r + j] += double{x.data<float>()[i * in + c]} * a.data<float>()[j * in + c];
      }
    }
    for (int64_t o = 0; o < out; ++o) {
      for (int64_t j = 0; j < r; ++j) y[i * out + o] += h[i * r + j] * b.data<float>()[o * r + j];
      y[i * out + o] *= scale;
    }
  }
  return y;
}

// Every fused site of every FusedParitySpecs adapter against its projections' deltas one by one;
// unfused sites (o, down) share the adapter's tensors.
TEST(AdapterWeights, FusedSitesEqualTheSumOfTheirProjections) {
  auto ctx = ops::Context::Cpu();
  const model::LlamaConfig c = ParityConfig(32);
  const int64_t n = 3;
  for (const ParitySpec& spec : FusedParitySpecs()) {
    auto lora = ParityAdapter(*ctx, c, spec);
    const AdapterWeights w = std::move(AdapterWeights::FromLora(*ctx, *lora, DType::kF32)).value();
    EXPECT_EQ(w.num_bytes(), AdapterWeights::BytesFor(*lora, DType::kF32));
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      for (int s = 0; s < kNumLoraSites; ++s) {
        const auto site = static_cast<LoraSite>(s);
        const std::vector<model::Projection> projs = LoraSiteProjections(site);
        const auto [in, out] = LoraSiteShape(c, site);
        const Tensor x = testing::RandomUniform({n, in}, 100 + l * 7 + s, -1.0f, 1.0f);
        std::vector<double> want(n * out, 0.0);
        int64_t col = 0, rank = 0;
        bool any = false;
        for (model::Projection p : projs) {
          const int64_t out_p = peft::ProjectionShape(c, p).second;
          const int t = lora->Find(l, p);
          if (t >= 0) {
            any = true;
            rank += lora->a(t).weight.dim(0);
            const std::vector<double> d =
                Delta(x, lora->a(t).weight, lora->b(t).weight, lora->targets()[t].scale);
            for (int64_t i = 0; i < n; ++i) {
              for (int64_t o = 0; o < out_p; ++o) want[i * out + col + o] = d[i * out_p + o];
            }
          }
          col += out_p;
        }
        const int t = w.Find(l, site);
        ASSERT_EQ(t >= 0, any) << "layer " << l << " site " << s;
        if (!any) continue;
        const AdapterWeights::Target& tg = w.targets[t];
        ASSERT_EQ(tg.a.shape(), (Shape{rank, in}));
        ASSERT_EQ(tg.b.shape(), (Shape{out, rank}));
        if (projs.size() == 1) {
          const int lt = lora->Find(l, projs[0]);
          EXPECT_EQ(tg.a.raw_data(), lora->a(lt).weight.raw_data());
          EXPECT_EQ(tg.b.raw_data(), lora->b(lt).weight.raw_data());
        }
        const std::vector<double> got = Delta(x, tg.a, tg.b, tg.scale);
        for (int64_t i = 0; i < n * out; ++i) {
          ASSERT_NEAR(got[i], want[i], 1e-5 * (1.0 + std::fabs(want[i])))
              << "layer " << l << " site " << s << " element " << i;
        }
      }
    }
  }
}

}  // namespace
}  // namespace tandem::serve
