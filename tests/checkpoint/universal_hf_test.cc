// HF conversions of universal checkpoints: export-hf of a tiny random model loads back into
// LlamaModel with identical weights; import-hf gives zero moments and step 0 and round-trips
// through export-hf; export-adapter writes a PEFT adapter that loads back identically.
#include "checkpoint/universal_hf.h"

#include <gtest/gtest.h>

#include <cstring>
#include <fstream>

#include "checkpoint/universal.h"
#include "model/llama.h"
#include "ops/context.h"
#include "peft/adapter_io.h"
#include "peft/lora.h"
#include "tests/common/testing.h"

namespace tandem::checkpoint {
namespace {

using ::tandem::testing::TempDir;

model::LlamaConfig TinyConfig(bool tied) {
  model::LlamaConfig c;
  c.vocab_size = 67;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.tie_word_embeddings = tied;
  return c;
}

bool SameBytes(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() &&
         std::memcmp(a.raw_data(), b.raw_data(), a.num_bytes()) == 0;
}

std::unique_ptr<model::LlamaModel> RandomModel(ops::Context& ctx, bool tied, uint64_t seed) {
  auto m = model::LlamaModel::Create(ctx, TinyConfig(tied), {});
  TANDEM_CHECK_OK(m.status());
  TANDEM_CHECK_OK((*m)->InitRandom(seed, 0.5f));
  return std::move(*m);
}

// A checkpoint of `model` as a trainer would save it on one rank (random moments).
std::string SaveModel(const model::LlamaModel& m, const std::string& dir) {
  std::vector<TensorShard> shards;
  uint64_t seed = 100;
  for (const model::Parameter& p : m.parameters()) {
    TensorShard s;
    s.name = p.name;
    s.logical_shape = p.master.shape();
    s.split = LlamaSplitSpec(p.name);
    s.slab = Hyperslab{Shape(p.master.shape().size(), 0), p.master.shape()};
    s.master = p.master;
    s.exp_avg = ::tandem::testing::RandomUniform(p.master.shape(), ++seed);
    s.exp_avg_sq = ::tandem::testing::RandomUniform(p.master.shape(), ++seed, 0.0f, 1.0f);
    s.step = 9;
    shards.push_back(std::move(s));
  }
  UniversalMeta meta;
  meta.step = 9;
  meta.model_config_json = model::LlamaConfigToJson(m.config());
  auto path = SaveUniversal(dir, meta, shards, nullptr, {});
  TANDEM_CHECK_OK(path.status());
  return *path;
}

TEST(UniversalHf, ExportHfLoadsIdenticalWeights) {
  for (bool tied : {false, true}) {
    auto ctx = ops::Context::Cpu();
    auto src = RandomModel(*ctx, tied, 3);
    TempDir dir;
    const std::string ckpt = SaveModel(*src, dir.Join("ckpt"));
    ASSERT_TRUE(ExportHf(ckpt, dir.Join("hf"), DType::kF32).ok());
    auto dst = RandomModel(*ctx, tied, 4);
    ASSERT_TRUE(dst->LoadSafetensors(dir.Join("hf")).ok());
    ASSERT_EQ(src->parameters().size(), dst->parameters().size());
    for (size_t i = 0; i < src->parameters().size(); ++i) {
      EXPECT_TRUE(SameBytes(src->parameters()[i].master, dst->parameters()[i].master))
          << src->parameters()[i].name << " tied=" << tied;
    }
    // bf16 export: each weight is the bf16 rounding of the master.
    ASSERT_TRUE(ExportHf(dir.path() + "/ckpt", dir.Join("hf16"), DType::kBF16).ok());
    ASSERT_TRUE(dst->LoadSafetensors(dir.Join("hf16")).ok());
    for (size_t i = 0; i < src->parameters().size(); ++i) {
      const Tensor& a = src->parameters()[i].master;
      const Tensor& b = dst->parameters()[i].master;
      for (int64_t k = 0; k < a.numel(); ++k) {
        ASSERT_EQ(RoundToBf16(a.data<float>()[k]), b.data<float>()[k]) << src->parameters()[i].name;
      }
    }
    auto config = model::LoadLlamaConfig(dir.Join("hf16") + "/config.json");
    ASSERT_TRUE(config.ok());
    EXPECT_EQ(config->torch_dtype, "bfloat16");
    EXPECT_EQ(config->tie_word_embeddings, tied);
  }
}

TEST(UniversalHf, ImportHfThenExportHfRoundTrips) {
  auto ctx = ops::Context::Cpu();
  auto src = RandomModel(*ctx, false, 5);
  TempDir dir;
  ASSERT_TRUE(src->SaveSafetensors(dir.Join("hf"), DType::kF32).ok());
  ASSERT_TRUE(ImportHf(dir.Join("hf"), dir.Join("imported.h5")).ok());
  auto reader = UniversalReader::Open(dir.Join("imported.h5"));
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  EXPECT_EQ(reader->meta().step, 0);
  EXPECT_EQ(reader->tensors().size(), src->parameters().size());
  for (const model::Parameter& p : src->parameters()) {
    auto s = reader->ReadAll(p.name);
    ASSERT_TRUE(s.ok()) << p.name;
    EXPECT_TRUE(SameBytes(s->master, p.master)) << p.name;
    EXPECT_EQ(s->step, 0);
    EXPECT_TRUE(s->trainable);
    for (const Tensor* m : {&s->exp_avg, &s->exp_avg_sq}) {
      ASSERT_TRUE(m->defined());
      for (int64_t k = 0; k < m->numel(); ++k) ASSERT_EQ(m->data<float>()[k], 0.0f) << p.name;
    }
    EXPECT_EQ(reader->Find(p.name)->split.tp_dim, LlamaSplitSpec(p.name).tp_dim);
  }
  ASSERT_TRUE(ExportHf(dir.Join("imported.h5"), dir.Join("out"), DType::kF32).ok());
  auto dst = RandomModel(*ctx, false, 6);
  ASSERT_TRUE(dst->LoadSafetensors(dir.Join("out")).ok());
  for (size_t i = 0; i < src->parameters().size(); ++i) {
    EXPECT_TRUE(SameBytes(src->parameters()[i].master, dst->parameters()[i].master));
  }
}

TEST(UniversalHf, ExportAdapterWritesPeftFormat) {
  auto ctx = ops::Context::Cpu();
  auto base = RandomModel(*ctx, false, 7);
  peft::LoraConfig lc;
  lc.r = 2;
  lc.alpha = 4;
  lc.target_modules = {"q_proj", "down_proj"};
  auto adapter = peft::LoraAdapter::Create(*ctx, base->config(), lc);
  ASSERT_TRUE(adapter.ok());
  std::vector<TensorShard> shards;
  for (size_t i = 0; i < (*adapter)->parameters().size(); ++i) {
    const model::Parameter& p = (*adapter)->parameters()[i];
    ASSERT_TRUE((*adapter)
                    ->SetFromHost(i, ::tandem::testing::RandomUniform(p.master.shape(), 50 + i))
                    .ok());
    TensorShard s;
    s.name = p.name;
    s.adapter = "chat";
    s.logical_shape = p.master.shape();
    s.slab = Hyperslab{Shape(2, 0), p.master.shape()};
    s.master = p.master;
    shards.push_back(std::move(s));
  }
  UniversalMeta meta;
  meta.model_config_json = model::LlamaConfigToJson(base->config());
  meta.adapter_configs["chat"] = peft::LoraConfigToJson(lc);
  TempDir dir;
  ASSERT_TRUE(SaveUniversal(dir.path(), meta, shards, nullptr, {}).ok());
  ASSERT_TRUE(ExportAdapter(dir.path(), "", dir.Join("peft"), DType::kF32).ok());
  auto loaded = peft::LoadLoraAdapter(*ctx, base->config(), dir.Join("peft"));
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  ASSERT_EQ((*loaded)->parameters().size(), (*adapter)->parameters().size());
  for (size_t i = 0; i < (*adapter)->parameters().size(); ++i) {
    EXPECT_TRUE(SameBytes((*loaded)->parameters()[i].master, (*adapter)->parameters()[i].master));
  }
  EXPECT_EQ(ExportAdapter(dir.path(), "nope", dir.Join("x"), DType::kF32).code(),
            StatusCode::kNotFound);
}

TEST(UniversalHf, BadInputsGiveClearErrors) {
  TempDir dir;
  std::ofstream(dir.Join("garbage.h5")) << "not hdf5 at all";
  Status s = ExportHf(dir.Join("garbage.h5"), dir.Join("out"), DType::kF32);
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.ToString();
  EXPECT_NE(s.message().find("garbage.h5"), std::string::npos);
  // A checkpoint without a model config cannot be exported.
  TensorShard t;
  t.name = "w";
  t.logical_shape = {2};
  t.slab = Hyperslab{{0}, {2}};
  t.master = ::tandem::testing::RandomUniform({2}, 1);
  ASSERT_TRUE(SaveUniversal(dir.Join("c"), UniversalMeta{}, {t}, nullptr, {}).ok());
  s = ExportHf(dir.Join("c"), dir.Join("out"), DType::kF32);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_NE(s.message().find("model config"), std::string::npos);
  EXPECT_EQ(ImportHf(dir.Join("missing"), dir.Join("x.h5")).code(), StatusCode::kNotFound);
  EXPECT_EQ(UniversalReader::Open(dir.Join("empty_dir_without_latest")).status().code(),
            StatusCode::kNotFound);
}

}  // namespace
}  // namespace tandem::checkpoint
