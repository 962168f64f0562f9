// LlamaModel on CUDA (bf16 weights and activations, f32 master, grads and losses): against the
// HF fixtures, against the CPU f32 model, and its own invariants (recompute, determinism, packed
// documents, save/load of the f32 master, frozen base). Skipped without a GPU.
//
// bf16 tolerances (bf16 keeps 8 significant bits, ~0.4% per rounding, through a few layers):
//   fixtures: logits |a - e| <= 0.05 + 0.05 |e| per element; mean loss within 1%; gradients
//             max|a - e| / max|e| <= 5e-2 per tensor; AdamW-step losses within 2%.
//   CPU vs GPU on the same (bf16-representable) weights: logits max-relative <= 2e-2, loss within
//             1%, gradients max-relative <= 5e-2 per tensor.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "tests/model/llama_golden.h"

namespace tandem::model {
namespace {

std::unique_ptr<ops::Context> Gpu() {
  StatusOr<std::unique_ptr<ops::Context>> ctx = ops::Context::Cuda(0);
  TANDEM_CHECK_OK(ctx);
  return std::move(ctx).value();
}

std::unique_ptr<LlamaModel> Make(ops::Context& ctx, const LlamaConfig& c, ModelOptions o = {}) {
  StatusOr<std::unique_ptr<LlamaModel>> m = LlamaModel::Create(ctx, c, o);
  TANDEM_CHECK_OK(m);
  return std::move(m).value();
}

Tensor Host(const Tensor& t) {
  StatusOr<Tensor> h = CopyToHostBlocking(t);
  TANDEM_CHECK_OK(h);
  return *h;
}

// Host copies of every parameter's gradient.
std::vector<Tensor> HostGrads(const LlamaModel& m) {
  std::vector<Tensor> out;
  for (const Parameter& p : m.parameters()) out.push_back(Host(p.grad));
  return out;
}

bool BitwiseEqual(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() &&
         std::memcmp(a.raw_data(), b.raw_data(), a.num_bytes()) == 0;
}

LlamaConfig SmallConfig() {
  LlamaConfig c;
  c.vocab_size = 300;
  c.hidden_size = 128;
  c.intermediate_size = 256;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.head_dim = 64;  // the CUDA attention kernel takes D 64 or 128
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  return c;
}

Batch RandomBatch(int64_t B, int64_t T, int64_t V, uint64_t seed) {
  Batch b;
  b.tokens = testing::RandomInts({B, T}, seed, static_cast<int32_t>(V));
  b.targets = testing::RandomInts({B, T}, seed + 1, static_cast<int32_t>(V));
  for (int64_t i = 0; i < B * T; i += 7) b.targets.data<int32_t>()[i] = ops::kIgnoreIndex;
  return b;
}

// The bf16 bound for one compared quantity: twice transformers' own bf16 error on the same
// fixture (meta.json "hf_bf16_errors"), never tighter than `floor`.
double Bf16Bound(const golden::GoldenCase& g, const std::string& key, double floor) {
  auto it = g.hf_bf16_errors.find(key);
  return it == g.hf_bf16_errors.end() ? floor : std::max(floor, 2.0 * it->second);
}

void CheckFixtureOnGpu(const std::string& dir, const golden::GoldenCase& g) {
  SCOPED_TRACE("fixture " + dir);
  auto ctx = Gpu();
  std::unique_ptr<LlamaModel> model = Make(*ctx, g.config);
  Status s = model->LoadSafetensors(dir);
  ASSERT_TRUE(s.ok()) << s.ToString();
  StatusOr<Tensor> logits = model->Logits(g.batch);
  ASSERT_TRUE(logits.ok()) << logits.status().ToString();
  EXPECT_LE(testing::MaxRelativeError(*logits, *g.expected.Get("logits")), Bf16Bound(g, "logits", 1e-2))
      << "logits";
  ASSERT_TRUE(model->ZeroGrads().ok());
  StatusOr<LossSum> loss = model->ForwardBackward(g.batch, 1.0f / g.count);
  ASSERT_TRUE(loss.ok()) << loss.status().ToString();
  const double expected_loss = g.expected.Get("loss")->data<float>()[0];
  EXPECT_NEAR(loss->sum / loss->count, expected_loss, Bf16Bound(g, "loss", 5e-3) * std::fabs(expected_loss));
  for (const Parameter& p : model->parameters()) {
    EXPECT_LE(testing::MaxRelativeError(Host(p.grad), *g.expected.Get("grad." + p.name)),
              Bf16Bound(g, "grad." + p.name, 2e-2))
        << "grad of " << p.name;
  }
  const Tensor expected_steps = *g.expected.Get("adamw_losses");
  StatusOr<std::vector<double>> steps =
      golden::AdamWLosses(*ctx, *model, g, static_cast<int>(expected_steps.numel()));
  ASSERT_TRUE(steps.ok()) << steps.status().ToString();
  for (size_t i = 0; i < steps->size(); ++i) {
    const double e = expected_steps.data<float>()[i];
    EXPECT_NEAR((*steps)[i], e, Bf16Bound(g, "adamw_losses", 1e-2) * std::fabs(e))
        << "loss before AdamW step " << i + 1;
  }
}

TEST(LlamaGpuTest, FixturesMatchTransformersInBf16) {
  TANDEM_SKIP_WITHOUT_GPU();
  const std::optional<std::vector<std::string>> dirs = golden::ModelFixtureDirs();
  if (!dirs) GTEST_SKIP() << "no golden fixtures: " << golden::GoldenRoot() << " does not exist";
  ASSERT_FALSE(dirs->empty()) << golden::GoldenRoot() << " holds no model fixture";
  int checked = 0;
  std::string unsupported;
  for (const std::string& dir : *dirs) {
    StatusOr<golden::GoldenCase> g = golden::LoadCase(dir);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    if (g->config.head_dim != 64 && g->config.head_dim != 128) {
      unsupported += StrCat(" ", dir, " (head_dim ", g->config.head_dim, ")");
      continue;
    }
    CheckFixtureOnGpu(dir, *g);
    ++checked;
  }
  if (!unsupported.empty()) {
    std::printf("fixtures not run on CUDA (its attention takes head_dim 64 or 128):%s\n",
                unsupported.c_str());
  }
  if (checked == 0)
    GTEST_SKIP() << "no fixture has a head_dim the CUDA attention supports:" << unsupported;
}

TEST(LlamaGpuTest, MatchesCpuModel) {
  TANDEM_SKIP_WITHOUT_GPU();
  const LlamaConfig c = SmallConfig();
  auto cpu_ctx = ops::Context::Cpu();
  auto gpu_ctx = Gpu();
  std::unique_ptr<LlamaModel> cpu = Make(*cpu_ctx, c), gpu = Make(*gpu_ctx, c);
  ASSERT_TRUE(cpu->InitRandom(5, 0.05f).ok());
  ASSERT_TRUE(gpu->InitRandom(5, 0.05f).ok());
  for (size_t i = 0; i < cpu->parameters().size(); ++i) {  // init is device-independent
    EXPECT_TRUE(BitwiseEqual(Host(gpu->parameters()[i].master), cpu->parameters()[i].weight))
        << cpu->parameters()[i].name;
  }
  for (Parameter& p : cpu->parameters()) {  // the CPU model sees the GPU's bf16 weights
    float* w = p.weight.data<float>();
    for (int64_t i = 0; i < p.weight.numel(); ++i) w[i] = RoundToBf16(w[i]);
  }
  const Batch batch = RandomBatch(2, 40, c.vocab_size, 7);
  const Tensor lc = *cpu->Logits(batch), lg = *gpu->Logits(batch);
  EXPECT_LE(testing::MaxRelativeError(lg, lc), 2e-2) << "logits";
  for (LlamaModel* m : {cpu.get(), gpu.get()}) ASSERT_TRUE(m->ZeroGrads().ok());
  const LossSum sc = *cpu->ForwardBackward(batch, 1.0f / 60);
  const LossSum sg = *gpu->ForwardBackward(batch, 1.0f / 60);
  EXPECT_EQ(sc.count, sg.count);
  EXPECT_NEAR(sg.sum, sc.sum, 0.01 * std::fabs(sc.sum));
  const std::vector<Tensor> gg = HostGrads(*gpu);
  for (size_t i = 0; i < gg.size(); ++i) {
    const Parameter& p = cpu->parameters()[i];
    EXPECT_LE(testing::MaxRelativeError(gg[i], p.grad), 5e-2) << "grad of " << p.name;
  }
}

TEST(LlamaGpuTest, RecomputeAndRepeatsAreBitwiseIdentical) {
  TANDEM_SKIP_WITHOUT_GPU();
  const LlamaConfig c = SmallConfig();
  auto ctx = Gpu();
  std::unique_ptr<LlamaModel> plain = Make(*ctx, c), re = Make(*ctx, c, {.recompute = true});
  const Batch batch = RandomBatch(2, 40, c.vocab_size, 9);
  std::vector<std::vector<Tensor>> runs;
  for (LlamaModel* m : {plain.get(), re.get(), plain.get()}) {
    ASSERT_TRUE(m->InitRandom(3, 0.05f).ok());
    ASSERT_TRUE(m->ZeroGrads().ok());
    ASSERT_TRUE(m->ForwardBackward(batch, 0.01f).ok());
    runs.push_back(HostGrads(*m));
  }
  for (size_t i = 0; i < runs[0].size(); ++i) {
    EXPECT_TRUE(BitwiseEqual(runs[0][i], runs[1][i]))
        << "recompute: " << plain->parameters()[i].name;
    EXPECT_TRUE(BitwiseEqual(runs[0][i], runs[2][i])) << "repeat: " << plain->parameters()[i].name;
  }
}

TEST(LlamaGpuTest, PackedDocumentsEqualSeparateRuns) {
  TANDEM_SKIP_WITHOUT_GPU();
  const LlamaConfig c = SmallConfig();
  auto ctx = Gpu();
  std::unique_ptr<LlamaModel> m = Make(*ctx, c);
  ASSERT_TRUE(m->InitRandom(4, 0.05f).ok());
  const int64_t T1 = 19, T2 = 26;
  const Batch d1 = RandomBatch(1, T1, c.vocab_size, 11), d2 = RandomBatch(1, T2, c.vocab_size, 12);
  Batch packed;
  for (Tensor* t : {&packed.tokens, &packed.targets, &packed.positions, &packed.segment_ids}) {
    *t = Tensor::Cpu({1, T1 + T2}, DType::kI32);
  }
  for (int64_t t = 0; t < T1 + T2; ++t) {
    const bool first = t < T1;
    const int64_t s = first ? t : t - T1;
    packed.tokens.data<int32_t>()[t] = (first ? d1 : d2).tokens.data<int32_t>()[s];
    packed.targets.data<int32_t>()[t] = (first ? d1 : d2).targets.data<int32_t>()[s];
    packed.positions.data<int32_t>()[t] = static_cast<int32_t>(s);
    packed.segment_ids.data<int32_t>()[t] = first ? 0 : 1;
  }
  const Tensor l1 = *m->Logits(d1), l2 = *m->Logits(d2), lp = *m->Logits(packed);
  Tensor joined = Tensor::Cpu(lp.shape(), DType::kF32);
  std::memcpy(joined.raw_data(), l1.raw_data(), l1.num_bytes());
  std::memcpy(static_cast<char*>(joined.raw_data()) + l1.num_bytes(), l2.raw_data(),
              l2.num_bytes());
  EXPECT_LE(testing::MaxRelativeError(lp, joined), 2e-2);
}

TEST(LlamaGpuTest, SavesTheF32MasterAndFreezesWithoutMasters) {
  TANDEM_SKIP_WITHOUT_GPU();
  const LlamaConfig c = SmallConfig();
  auto gpu_ctx = Gpu();
  auto cpu_ctx = ops::Context::Cpu();
  std::unique_ptr<LlamaModel> gpu = Make(*gpu_ctx, c), cpu = Make(*cpu_ctx, c);
  ASSERT_TRUE(gpu->InitRandom(8, 0.05f).ok());
  testing::TempDir dir;
  ASSERT_TRUE(gpu->SaveSafetensors(dir.path(), DType::kF32).ok());
  ASSERT_TRUE(cpu->LoadSafetensors(dir.path()).ok());
  for (size_t i = 0; i < cpu->parameters().size(); ++i) {
    const Parameter& p = gpu->parameters()[i];
    EXPECT_TRUE(BitwiseEqual(Host(p.master), cpu->parameters()[i].weight)) << p.name;
    EXPECT_EQ(p.weight.dtype(), DType::kBF16);
  }
  std::unique_ptr<LlamaModel> frozen = Make(*gpu_ctx, c, {.trainable = false});
  ASSERT_TRUE(frozen->LoadSafetensors(dir.path()).ok());
  for (const Parameter& p : frozen->parameters()) {
    EXPECT_FALSE(p.master.defined()) << p.name;
    EXPECT_FALSE(p.grad.defined()) << p.name;
  }
  const Batch batch = RandomBatch(2, 16, c.vocab_size, 13);
  StatusOr<LossSum> a = frozen->ForwardBackward(batch, 1.0f);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  StatusOr<LossSum> b = gpu->Loss(batch);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(a->sum, b->sum);  // same bf16 weights, same kernels
}

}  // namespace
}  // namespace tandem::model
