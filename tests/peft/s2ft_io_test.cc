// S²FT adapter files: round trip (weights, selection, the model's logits after merge) and bad
// files (missing tensor, wrong shape, index out of range, duplicate index, other base model,
// unexpected tensor, heads that are not whole kv groups, another format).
#include "peft/s2ft_io.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "model/safetensors.h"
#include "peft/s2ft.h"
#include "tests/peft/peft_test_util.h"

namespace tandem::peft {
namespace {

using ::tandem::testing::AllClose;
using ::tandem::testing::RandomUniform;
using ::tandem::testing::TempDir;
using testing::MakeBase;
using testing::MakeBatch;
using testing::TinyConfig;
using Json = nlohmann::ordered_json;

std::unique_ptr<S2ftAdapter> TrainedLooking(ops::Context& ctx, model::LlamaModel& base,
                                            bool coupled) {
  S2ftConfig cfg;
  cfg.heads_fraction = 0.5;
  cfg.ffn_fraction = 0.25;
  cfg.coupled = coupled;
  cfg.seed = 21;
  cfg.base_model_name_or_path = "tiny";
  auto ad = std::move(PrepareS2ft(ctx, base, cfg)).value();
  for (size_t i = 0; i < ad->parameters().size(); ++i) {
    TANDEM_CHECK_OK(
        ad->SetFromHost(i, RandomUniform(ad->parameters()[i].master.shape(), 40 + i, -0.3f, 0.3f)));
  }
  return ad;
}

Json ReadJson(const std::string& path) {
  std::ifstream in(path);
  return Json::parse(in);
}
void WriteJson(const std::string& path, const Json& j) { std::ofstream(path) << j.dump(2); }

class S2ftIoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ctx_ = ops::Context::Cpu();
    config_ = TinyConfig();
    base_ = MakeBase(*ctx_, config_, 31);
    adapter_ = TrainedLooking(*ctx_, *base_, /*coupled=*/true);
    ASSERT_TRUE(SaveS2ftAdapter(*adapter_, dir_.path()).ok());
  }
  std::string ConfigPath() const { return dir_.Join(kS2ftConfigFile); }
  std::string WeightsPath() const { return dir_.Join(kS2ftWeightsFile); }
  // The load error after `edit` changes the config file.
  Status LoadAfter(const std::function<void(Json&)>& edit) {
    Json j = ReadJson(ConfigPath());
    edit(j);
    WriteJson(ConfigPath(), j);
    return LoadS2ftAdapter(*ctx_, config_, dir_.path()).status();
  }

  std::unique_ptr<ops::Context> ctx_;
  model::LlamaConfig config_;
  std::unique_ptr<model::LlamaModel> base_;
  std::unique_ptr<S2ftAdapter> adapter_;
  TempDir dir_;
};

TEST_F(S2ftIoTest, RoundTripKeepsBlocksSelectionAndLogits) {
  auto loaded = LoadS2ftAdapter(*ctx_, config_, dir_.path());
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  S2ftAdapter& b = **loaded;
  ASSERT_EQ(b.blocks().size(), adapter_->blocks().size());
  EXPECT_TRUE(b.config().coupled);
  EXPECT_EQ(b.config().base_model_name_or_path, "tiny");
  for (size_t i = 0; i < b.blocks().size(); ++i) {
    EXPECT_EQ(b.blocks()[i].indices, adapter_->blocks()[i].indices);
    EXPECT_TRUE(AllClose(*b.ToHost(i), *adapter_->ToHost(i), {0, 0})) << b.blocks()[i].name;
  }
  for (size_t l = 0; l < 2; ++l) {
    EXPECT_EQ(b.selection().layers[l].heads, adapter_->selection().layers[l].heads);
    EXPECT_EQ(b.selection().layers[l].channels, adapter_->selection().layers[l].channels);
  }
  // The saved indices are original: merging the loaded adapter into a fresh (unpermuted) base
  // gives the trained model's logits.
  const model::Batch batch = MakeBatch(2, 6, config_.vocab_size, 32);
  base_->SetAdapter(adapter_.get());
  const Tensor trained = *base_->Logits(batch);
  auto fresh = MakeBase(*ctx_, config_, 31);
  ASSERT_TRUE(b.Merge(*fresh).ok());
  EXPECT_TRUE(AllClose(*fresh->Logits(batch), trained, {1e-5, 1e-5}));
  // bf16 files load too (rounded).
  TempDir bf16;
  ASSERT_TRUE(SaveS2ftAdapter(*adapter_, bf16.path(), DType::kBF16).ok());
  auto lb = LoadS2ftAdapter(*ctx_, config_, bf16.path());
  ASSERT_TRUE(lb.ok()) << lb.status().ToString();
  EXPECT_TRUE(AllClose(*(*lb)->ToHost(0), *adapter_->ToHost(0), {0, 4e-3}));
}

TEST_F(S2ftIoTest, MissingTensorIsAnError) {
  const std::string name = adapter_->blocks()[1].name;
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (size_t i = 0; i < adapter_->blocks().size(); ++i) {
    if (i != 1) tensors.emplace_back(adapter_->blocks()[i].name, *adapter_->ToHost(i));
  }
  ASSERT_TRUE(model::WriteSafetensors(WeightsPath(), tensors).ok());
  const Status s = LoadS2ftAdapter(*ctx_, config_, dir_.path()).status();
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_NE(s.message().find(name), std::string::npos) << s.message();
}

TEST_F(S2ftIoTest, WrongShapeAndUnexpectedTensorsAreErrors) {
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (size_t i = 0; i < adapter_->blocks().size(); ++i) {
    const Shape& sh = adapter_->blocks()[i].shape;
    tensors.emplace_back(adapter_->blocks()[i].name,
                         i == 0 ? RandomUniform({sh[0] + 1, sh[1]}, 5) : *adapter_->ToHost(i));
  }
  ASSERT_TRUE(model::WriteSafetensors(WeightsPath(), tensors).ok());
  Status s = LoadS2ftAdapter(*ctx_, config_, dir_.path()).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("has shape"), std::string::npos) << s.message();
  tensors[0].second = *adapter_->ToHost(0);
  tensors.emplace_back("model.layers.0.mlp.down_proj.lora_A.weight", RandomUniform({2, 24}, 6));
  ASSERT_TRUE(model::WriteSafetensors(WeightsPath(), tensors).ok());
  s = LoadS2ftAdapter(*ctx_, config_, dir_.path()).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("unexpected tensor"), std::string::npos) << s.message();
}

TEST_F(S2ftIoTest, IndexOutOfRangeIsAnError) {
  const Status s = LoadAfter([](Json& j) { j["blocks"][0]["indices"][0] = 1000; });
  EXPECT_EQ(s.code(), StatusCode::kOutOfRange);
  EXPECT_NE(s.message().find("1000"), std::string::npos) << s.message();
  const Status h = LoadAfter([](Json& j) {
    j["blocks"][0]["indices"][0] = 0;
    j["layers"][1]["channels"][0] = 24;
  });
  EXPECT_EQ(h.code(), StatusCode::kOutOfRange) << h.ToString();
}

TEST_F(S2ftIoTest, DuplicateIndicesAreErrors) {
  const Status s = LoadAfter([](Json& j) {
    Json& idx = j["blocks"][0]["indices"];
    idx[1] = idx[0];
  });
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("duplicate"), std::string::npos) << s.message();
}

TEST_F(S2ftIoTest, IndicesThatAreNotTheSelectionsAreErrors) {
  const Status s = LoadAfter([](Json& j) {
    Json& idx = j["blocks"].back()["indices"];  // a down_proj block: its channels, shifted
    for (Json& i : idx) i = (i.get<int64_t>() + 1) % 24;
  });
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
}

TEST_F(S2ftIoTest, OtherBaseModelIsAnError) {
  model::LlamaConfig other = config_;
  other.intermediate_size = 32;
  Status s = LoadS2ftAdapter(*ctx_, other, dir_.path()).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("different base model"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("intermediate_size"), std::string::npos) << s.message();
}

TEST_F(S2ftIoTest, HeadsMustBeWholeKvGroups) {
  const Status s = LoadAfter([](Json& j) {
    Json& heads = j["layers"][0]["heads"];
    heads = Json::array({heads[0]});
  });
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("whole kv groups"), std::string::npos) << s.message();
}

TEST_F(S2ftIoTest, OtherFormatsAndMissingFilesAreErrors) {
  EXPECT_EQ(LoadAfter([](Json& j) { j["format_version"] = 2; }).code(), StatusCode::kUnimplemented);
  TempDir empty;
  EXPECT_EQ(LoadS2ftAdapter(*ctx_, config_, empty.path()).status().code(), StatusCode::kNotFound);
  EXPECT_FALSE(IsS2ftAdapterDir(empty.path()));
  EXPECT_TRUE(IsS2ftAdapterDir(dir_.path()));
  EXPECT_EQ(LoadAfter([](Json& j) {
              j["format_version"] = 1;
              j["layers"] = "x";
            }).code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tandem::peft
