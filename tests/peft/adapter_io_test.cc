// PEFT-format adapter files: save -> load round trips, and clear errors for bad files.
#include "peft/adapter_io.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "model/safetensors.h"
#include "tests/peft/peft_test_util.h"

namespace tandem::peft {
namespace {

using ::tandem::testing::TempDir;
using testing::MakeAdapter;
using testing::TinyConfig;

LoraConfig Config() {
  LoraConfig c;
  c.r = 4;
  c.alpha = 8;
  c.dropout = 0.1;
  c.target_modules = {"q_proj", "v_proj", "down_proj", "layers.1.self_attn.o_proj"};
  c.use_rslora = true;
  c.rank_pattern = {{"layers.0.mlp.down_proj", 2}};
  c.alpha_pattern = {{"v_proj", 3.0}};
  c.base_model_name_or_path = "tiny-llama";
  return c;
}

std::string ReadText(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
void WriteText(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

// Rewrites <dir>/adapter_config.json with one key changed.
void EditConfig(const std::string& dir, const std::string& key, const nlohmann::json& value) {
  const std::string path = dir + "/adapter_config.json";
  nlohmann::ordered_json j = nlohmann::ordered_json::parse(ReadText(path));
  j[key] = value;
  WriteText(path, j.dump(2));
}

// Rewrites <dir>/adapter_model.safetensors through `edit` of its (name, tensor) list.
void EditTensors(const std::string& dir,
                 const std::function<void(std::vector<std::pair<std::string, Tensor>>&)>& edit) {
  const std::string path = dir + "/adapter_model.safetensors";
  std::vector<std::pair<std::string, Tensor>> tensors;
  {
    const model::SafetensorsFile f = *model::SafetensorsFile::Open(path);
    for (const auto& info : f.tensors()) {
      tensors.emplace_back(info.name, testing::Clone(*f.Get(info.name)));
    }
  }
  edit(tensors);
  TANDEM_CHECK_OK(model::WriteSafetensors(path, tensors));
}

// Drops the tensors whose name contains `part`.
void Erase(std::vector<std::pair<std::string, Tensor>>& ts, const std::string& part) {
  ts.erase(std::remove_if(ts.begin(), ts.end(),
                          [&](const auto& t) { return t.first.find(part) != std::string::npos; }),
           ts.end());
}

class AdapterIoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    adapter_ = MakeAdapter(*ctx_, TinyConfig(), Config(), 5);
    ASSERT_TRUE(SaveLoraAdapter(*adapter_, dir_.path()).ok());
  }
  StatusOr<std::unique_ptr<LoraAdapter>> Load(const model::LlamaConfig& base = TinyConfig()) {
    return LoadLoraAdapter(*ctx_, base, dir_.path());
  }
  // The load fails with `code` and a message holding every one of `parts`, and so does the
  // header-only check (CheckLoraAdapterDir) with the same status.
  void ExpectError(StatusCode code, std::initializer_list<const char*> parts,
                   const model::LlamaConfig& base = TinyConfig()) {
    const Status s = Load(base).status();
    EXPECT_EQ(s.code(), code) << s.ToString();
    for (const char* p : parts) EXPECT_NE(s.message().find(p), std::string::npos) << s.ToString();
    const Status checked = CheckLoraAdapterDir(base, dir_.path()).status();
    EXPECT_EQ(checked.code(), code) << checked.ToString();
    for (const char* p : parts) {
      EXPECT_NE(checked.message().find(p), std::string::npos) << checked.ToString();
    }
  }

  std::unique_ptr<ops::Context> ctx_ = ops::Context::Cpu();
  TempDir dir_;
  std::unique_ptr<LoraAdapter> adapter_;
};

TEST_F(AdapterIoTest, RoundTrip) {
  auto loaded = Load();
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  const LoraConfig& c = (*loaded)->config();
  EXPECT_EQ(c.r, 4);
  EXPECT_EQ(c.alpha, 8.0);
  EXPECT_EQ(c.dropout, 0.1);
  EXPECT_TRUE(c.use_rslora);
  EXPECT_EQ(c.rank_pattern, Config().rank_pattern);
  EXPECT_EQ(c.alpha_pattern, Config().alpha_pattern);
  EXPECT_EQ(c.base_model_name_or_path, "tiny-llama");
  ASSERT_EQ((*loaded)->parameters().size(), adapter_->parameters().size());
  for (size_t i = 0; i < adapter_->parameters().size(); ++i) {
    const model::Parameter& a = adapter_->parameters()[i];
    const model::Parameter& b = (*loaded)->parameters()[i];
    EXPECT_EQ(a.name, b.name);
    EXPECT_TRUE(testing::AllClose(b.master, a.master, {0, 0})) << a.name;
  }
  const std::vector<LoraTarget>& t = (*loaded)->targets();
  ASSERT_EQ(t.size(), 7u);  // q, v, down in 2 layers + layer 1 o
  EXPECT_EQ(t[2].module, "model.layers.0.mlp.down_proj");
  EXPECT_EQ(t[2].rank, 2);

  // The files as PEFT writes them.
  const nlohmann::json j = nlohmann::json::parse(ReadText(dir_.Join("adapter_config.json")));
  EXPECT_EQ(j["peft_type"], "LORA");
  EXPECT_EQ(j["r"], 4);
  EXPECT_EQ(j["lora_alpha"], 8);
  EXPECT_EQ(j["bias"], "none");
  EXPECT_EQ(j["task_type"], "CAUSAL_LM");
  EXPECT_EQ(j["use_dora"], false);
  const model::SafetensorsFile f =
      *model::SafetensorsFile::Open(dir_.Join("adapter_model.safetensors"));
  EXPECT_EQ(f.metadata().at("format"), "pt");
  const auto* a = f.Find("base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight");
  const auto* b = f.Find("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight");
  ASSERT_TRUE(a != nullptr && b != nullptr);
  EXPECT_EQ(a->shape, (Shape{4, 16}));  // [r, in]
  EXPECT_EQ(b->shape, (Shape{8, 4}));   // [out, r]: Hkv * D = 8
  EXPECT_EQ(a->dtype, DType::kF32);
}

TEST_F(AdapterIoTest, Bf16RoundTrip) {
  TempDir bf16_dir;
  ASSERT_TRUE(SaveLoraAdapter(*adapter_, bf16_dir.path(), DType::kBF16).ok());
  auto loaded = LoadLoraAdapter(*ctx_, TinyConfig(), bf16_dir.path());
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  for (size_t i = 0; i < adapter_->parameters().size(); ++i) {
    const Tensor rounded =
        *CastCpu(*CastCpu(adapter_->parameters()[i].master, DType::kBF16), DType::kF32);
    EXPECT_TRUE(testing::AllClose((*loaded)->parameters()[i].master, rounded, {0, 0}));
  }
}

TEST_F(AdapterIoTest, UnsupportedConfigs) {
  EditConfig(dir_.path(), "peft_type", "IA3");
  ExpectError(StatusCode::kUnimplemented, {"adapter_config.json", "peft_type", "IA3"});
  EditConfig(dir_.path(), "peft_type", "LORA");
  EditConfig(dir_.path(), "use_dora", true);
  ExpectError(StatusCode::kUnimplemented, {"adapter_config.json", "use_dora"});
  EditConfig(dir_.path(), "use_dora", false);
  EditConfig(dir_.path(), "bias", "all");
  ExpectError(StatusCode::kUnimplemented, {"bias", "all"});
  EditConfig(dir_.path(), "bias", "none");
  EditConfig(dir_.path(), "modules_to_save", {"lm_head"});
  ExpectError(StatusCode::kUnimplemented, {"modules_to_save"});
  EditConfig(dir_.path(), "modules_to_save", nullptr);
  EditConfig(dir_.path(), "init_lora_weights", "pissa_niter_4");
  ExpectError(StatusCode::kUnimplemented, {"init_lora_weights", "pissa"});
  EditConfig(dir_.path(), "init_lora_weights", "gaussian");
  EXPECT_TRUE(Load().ok());
  EditConfig(dir_.path(), "task_type", "SEQ_CLS");
  ExpectError(StatusCode::kUnimplemented, {"task_type", "SEQ_CLS"});
  EditConfig(dir_.path(), "task_type", "CAUSAL_LM");
  EditConfig(dir_.path(), "target_modules", ".*proj");
  ExpectError(StatusCode::kUnimplemented, {"target_modules", "regex"});
  EditConfig(dir_.path(), "target_modules", {"q_proj", "qkv_proj"});
  ExpectError(StatusCode::kInvalidArgument, {"qkv_proj", "matches no module"});
  EditConfig(dir_.path(), "target_modules", {"q_proj", "v_proj", "down_proj", "o_proj"});
  ExpectError(StatusCode::kNotFound, {"missing tensor", "layers.0.self_attn.o_proj.lora_A"});
  EditConfig(dir_.path(), "target_modules",
             {"q_proj", "v_proj", "down_proj", "layers.1.self_attn.o_proj"});
  // Unknown keys: fine when null/false/empty (newer PEFT defaults), an error otherwise.
  EditConfig(dir_.path(), "some_future_option", nullptr);
  EXPECT_TRUE(Load().ok());
  EditConfig(dir_.path(), "some_future_option", 3);
  ExpectError(StatusCode::kInvalidArgument, {"unknown key", "some_future_option"});
  WriteText(dir_.Join("adapter_config.json"), "{\"peft_type\": \"LORA\", \"r\": ");
  ExpectError(StatusCode::kInvalidArgument, {"adapter_config.json", "not a JSON object"});
  std::filesystem::remove(dir_.Join("adapter_config.json"));
  ExpectError(StatusCode::kNotFound, {"adapter_config.json"});
}

TEST_F(AdapterIoTest, BadTensors) {
  const std::string q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
  EditTensors(dir_.path(), [&](auto& ts) {
    ts.erase(std::find_if(ts.begin(), ts.end(), [&](const auto& t) { return t.first == q_a; }));
  });
  ExpectError(StatusCode::kNotFound, {"adapter_model.safetensors", "missing tensor", q_a.c_str()});
  EditTensors(dir_.path(), [&](auto& ts) {
    ts.emplace_back(q_a, Tensor::CpuZeros({4, 17}, DType::kF32));
  });
  ExpectError(StatusCode::kInvalidArgument, {"adapter_model.safetensors", q_a.c_str(), "[4, 17]",
                                             "[4, 16]", "different base model"});
  EditTensors(dir_.path(), [&](auto& ts) {
    for (auto& t : ts) {
      if (t.first == q_a) t.second = Tensor::CpuZeros({4, 16}, DType::kF32);
    }
    ts.emplace_back("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                    Tensor::CpuZeros({16}, DType::kF32));
  });
  ExpectError(StatusCode::kInvalidArgument, {"unexpected tensor", "DoRA"});
  EditTensors(dir_.path(), [&](auto& ts) {
    Erase(ts, "lora_magnitude_vector");
    ts.emplace_back("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight",
                    Tensor::CpuZeros({4, 16}, DType::kF32));
  });
  ExpectError(StatusCode::kInvalidArgument, {"unexpected tensor", "k_proj", "target_modules"});
  EditTensors(dir_.path(), [&](auto& ts) { Erase(ts, "k_proj"); });
  EXPECT_TRUE(Load().ok());
  const StatusOr<LoraAdapterInfo> info = CheckLoraAdapterDir(TinyConfig(), dir_.path());
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_EQ(info->targets.size(), (*Load())->targets().size());
  EXPECT_EQ(info->config.r, (*Load())->config().r);
  EditTensors(dir_.path(), [&](auto& ts) {  // an integer tensor: the check reads the header
    for (auto& t : ts) {
      if (t.first == q_a) t.second = Tensor::CpuZeros({4, 16}, DType::kI32);
    }
  });
  ExpectError(StatusCode::kInvalidArgument, {q_a.c_str(), "I32"});
  EditTensors(dir_.path(), [&](auto& ts) {
    for (auto& t : ts) {
      if (t.first == q_a) t.second = Tensor::CpuZeros({4, 16}, DType::kF32);
    }
  });
  std::filesystem::remove(dir_.Join("adapter_model.safetensors"));
  ExpectError(StatusCode::kNotFound, {"adapter_model.safetensors"});
  WriteText(dir_.Join("adapter_model.bin"), "pickle");
  ExpectError(StatusCode::kUnimplemented, {"adapter_model.bin"});
}

TEST_F(AdapterIoTest, DifferentBaseModel) {
  model::LlamaConfig wider = TinyConfig();
  wider.hidden_size = 24;
  wider.head_dim = 6;
  ExpectError(StatusCode::kInvalidArgument, {"has shape", "different base model"}, wider);
  model::LlamaConfig shallower = TinyConfig();
  shallower.num_hidden_layers = 1;
  // "layers.1.self_attn.o_proj" selects nothing in a one-layer model.
  ExpectError(StatusCode::kInvalidArgument, {"layers.1.self_attn.o_proj"}, shallower);
  EditConfig(dir_.path(), "target_modules", {"q_proj", "v_proj", "down_proj"});
  EditTensors(dir_.path(), [&](auto& ts) { Erase(ts, "o_proj"); });
  ExpectError(StatusCode::kInvalidArgument, {"layer 1 does not exist", "1 layers"}, shallower);
}

}  // namespace
}  // namespace tandem::peft
