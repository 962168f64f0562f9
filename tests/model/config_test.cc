// LlamaConfig: parsing real-world shapes, defaults, every validation error, save -> load.
#include "model/config.h"

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "model/rope.h"
#include "tests/common/testing.h"

namespace tandem::model {
namespace {

using nlohmann::json;

// A Llama-3.2-1B style config.
json Llama32Json() {
  return json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "attention_bias": false, "mlp_bias": false, "vocab_size": 128256, "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rms_norm_eps": 1e-05, "tie_word_embeddings": true, "max_position_embeddings": 131072,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16",
    "use_cache": true, "pretraining_tp": 1
  })");
}

StatusOr<LlamaConfig> Parse(const json& j) { return ParseLlamaConfigJson(j.dump(), "cfg.json"); }

// The error must be InvalidArgument and mention every fragment.
void ExpectError(const json& j, std::initializer_list<const char*> fragments) {
  StatusOr<LlamaConfig> c = Parse(j);
  ASSERT_FALSE(c.ok()) << j.dump();
  EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument) << c.status().ToString();
  EXPECT_NE(c.status().message().find("cfg.json"), std::string::npos) << c.status().ToString();
  for (const char* f : fragments) {
    EXPECT_NE(c.status().message().find(f), std::string::npos)
        << "missing '" << f << "' in: " << c.status().ToString();
  }
}

TEST(LlamaConfigTest, ParsesLlama32) {
  StatusOr<LlamaConfig> c = Parse(Llama32Json());
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->vocab_size, 128256);
  EXPECT_EQ(c->hidden_size, 2048);
  EXPECT_EQ(c->intermediate_size, 8192);
  EXPECT_EQ(c->num_hidden_layers, 16);
  EXPECT_EQ(c->num_attention_heads, 32);
  EXPECT_EQ(c->num_key_value_heads, 8);
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_EQ(c->rope_theta, 500000.0);
  EXPECT_EQ(c->rope_scaling.rope_type, "llama3");
  EXPECT_EQ(c->rope_scaling.factor, 32.0);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_EQ(c->rms_norm_eps, 1e-5);
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_EQ(c->max_position_embeddings, 131072);
  EXPECT_EQ(c->bos_token_id, 128000);
  EXPECT_EQ(c->eos_token_id, 128001);
  EXPECT_EQ(c->eos_token_ids, (std::vector<int32_t>{128001, 128008, 128009}));
  EXPECT_EQ(c->torch_dtype, "bfloat16");
  // Llama-3.2-1B has 1,235,814,400 parameters (tied embeddings).
  EXPECT_EQ(c->NumParameters(), 1235814400);
}

TEST(LlamaConfigTest, DefaultsFollowTransformers) {
  json j = {{"vocab_size", 100},      {"hidden_size", 64},        {"intermediate_size", 128},
            {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"eos_token_id", 7}};
  StatusOr<LlamaConfig> c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->num_key_value_heads, 4);  // = heads
  EXPECT_EQ(c->head_dim, 16);            // = hidden / heads
  EXPECT_EQ(c->rope_theta, 10000.0);
  EXPECT_TRUE(c->rope_scaling.rope_type.empty());
  EXPECT_EQ(c->rms_norm_eps, 1e-6);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_FALSE(c->bos_token_id.has_value());
  EXPECT_EQ(c->eos_token_id, 7);
  EXPECT_EQ(c->eos_token_ids, std::vector<int32_t>{7});
  // 100*64 embed + 2 * (4*64*64 + 3*64*128 + 2*64) + 64 + 100*64 lm_head.
  EXPECT_EQ(c->NumParameters(), 6400 + 2 * (16384 + 24576 + 128) + 64 + 6400);
}

TEST(LlamaConfigTest, DefaultRopeTypeAndNullScalingMeanNone) {
  json j = Llama32Json();
  j["rope_scaling"] = {{"rope_type", "default"}};
  ASSERT_TRUE(Parse(j).ok());
  EXPECT_TRUE(Parse(j)->rope_scaling.rope_type.empty());
  j["rope_scaling"] = nullptr;
  ASSERT_TRUE(Parse(j).ok());
  EXPECT_TRUE(Parse(j)->rope_scaling.rope_type.empty());
}

// transformers 5 writes rope settings as "rope_parameters", theta included.
TEST(LlamaConfigTest, ParsesRopeParameters) {
  json j = Llama32Json();
  j.erase("rope_scaling");
  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 250000.0}};
  StatusOr<LlamaConfig> c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->rope_theta, 250000.0);
  EXPECT_TRUE(c->rope_scaling.rope_type.empty());
  j["rope_parameters"] = {{"rope_type", "llama3"},   {"rope_theta", 500000.0},
                          {"factor", 8.0},           {"low_freq_factor", 1.0},
                          {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 16}};
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->rope_theta, 500000.0);
  EXPECT_EQ(c->rope_scaling.rope_type, "llama3");
  EXPECT_EQ(c->rope_scaling.factor, 8.0);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 16);
  j["rope_parameters"]["rope_type"] = "dynamic";
  ExpectError(j, {"rope_parameters", "unsupported rope type \"dynamic\""});
}

TEST(LlamaConfigTest, MissingFile) {
  StatusOr<LlamaConfig> c = LoadLlamaConfig("/nonexistent/dir/config.json");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kNotFound);
  EXPECT_NE(c.status().message().find("/nonexistent/dir/config.json"), std::string::npos);
}

TEST(LlamaConfigTest, MalformedJsonNamesPosition) {
  StatusOr<LlamaConfig> c =
      ParseLlamaConfigJson("{\"vocab_size\": 12,\n \"hidden_size\": }", "cfg.json");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find("cfg.json: malformed JSON at byte 36"), std::string::npos)
      << c.status().ToString();
  EXPECT_NE(c.status().message().find("line 2"), std::string::npos) << c.status().ToString();
}

TEST(LlamaConfigTest, NotAnObject) { ExpectError(json::array({1, 2}), {"expected a JSON object"}); }

TEST(LlamaConfigTest, MissingRequiredKey) {
  for (const char* key : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads"}) {
    json j = Llama32Json();
    j.erase(key);
    ExpectError(j, {"missing required key", key});
  }
}

TEST(LlamaConfigTest, WrongTypeInt) {
  json j = Llama32Json();
  j["hidden_size"] = "2048";
  ExpectError(j, {"'hidden_size'", "expected an integer", "string"});
  j = Llama32Json();
  j["num_hidden_layers"] = 16.5;
  ExpectError(j, {"'num_hidden_layers'", "expected an integer"});
}

TEST(LlamaConfigTest, WrongTypeNumberBoolAndIds) {
  json j = Llama32Json();
  j["rope_theta"] = "big";
  ExpectError(j, {"'rope_theta'", "expected a number"});
  j = Llama32Json();
  j["tie_word_embeddings"] = 1;
  ExpectError(j, {"'tie_word_embeddings'", "expected true or false"});
  j = Llama32Json();
  j["eos_token_id"] = json::array({1, "two"});
  ExpectError(j, {"'eos_token_id'", "token id"});
  j = Llama32Json();
  j["rope_scaling"] = 3;
  ExpectError(j, {"'rope_scaling'", "expected an object or null"});
}

TEST(LlamaConfigTest, UnsupportedArchitecture) {
  json j = Llama32Json();
  j["architectures"] = json::array({"MistralForCausalLM"});
  ExpectError(j, {"'architectures'", "MistralForCausalLM", "supported: \"LlamaForCausalLM\""});
}

TEST(LlamaConfigTest, UnsupportedModelType) {
  json j = Llama32Json();
  j["model_type"] = "qwen2";
  ExpectError(j, {"'model_type'", "qwen2", "supported: \"llama\""});
}

TEST(LlamaConfigTest, UnsupportedActivation) {
  json j = Llama32Json();
  j["hidden_act"] = "gelu";
  ExpectError(j, {"'hidden_act'", "gelu", "silu"});
}

TEST(LlamaConfigTest, AttentionBias) {
  json j = Llama32Json();
  j["attention_bias"] = true;
  ExpectError(j, {"'attention_bias'", "biases are not supported"});
}

TEST(LlamaConfigTest, MlpBias) {
  json j = Llama32Json();
  j["mlp_bias"] = true;
  ExpectError(j, {"'mlp_bias'", "biases are not supported"});
}

TEST(LlamaConfigTest, HiddenNotDivisibleByHeads) {
  json j = Llama32Json();
  j.erase("head_dim");
  j["num_attention_heads"] = 30;
  j["num_key_value_heads"] = 10;
  ExpectError(j, {"'num_attention_heads'",
                  "hidden_size 2048 is not divisible by "
                  "num_attention_heads 30"});
}

TEST(LlamaConfigTest, HeadsNotDivisibleByKvHeads) {
  json j = Llama32Json();
  j["num_key_value_heads"] = 5;
  ExpectError(j, {"'num_key_value_heads'",
                  "num_attention_heads 32 is not divisible by "
                  "num_key_value_heads 5"});
}

TEST(LlamaConfigTest, OddHeadDim) {
  json j = Llama32Json();
  j["head_dim"] = 63;
  ExpectError(j, {"'head_dim'", "even", "63"});
}

TEST(LlamaConfigTest, NonPositiveSize) {
  json j = Llama32Json();
  j["intermediate_size"] = 0;
  ExpectError(j, {"'intermediate_size'", "positive", "found 0"});
}

TEST(LlamaConfigTest, UnsupportedRopeType) {
  json j = Llama32Json();
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  ExpectError(j, {"rope_scaling", "'rope_type'", "yarn", "\"llama3\""});
}

TEST(LlamaConfigTest, Llama3ScalingMissingKey) {
  json j = Llama32Json();
  j["rope_scaling"].erase("low_freq_factor");
  ExpectError(j, {"rope_scaling", "missing required key 'low_freq_factor'"});
}

TEST(LlamaConfigTest, SaveLoadRoundTrip) {
  testing::TempDir dir;
  for (bool multi_eos : {false, true}) {
    StatusOr<LlamaConfig> c = Parse(Llama32Json());
    ASSERT_TRUE(c.ok());
    if (!multi_eos) c->eos_token_ids = {128001};
    const std::string path = dir.Join("config.json");
    ASSERT_TRUE(SaveLlamaConfig(*c, path).ok());
    StatusOr<LlamaConfig> back = LoadLlamaConfig(path);
    ASSERT_TRUE(back.ok()) << back.status().ToString();
    EXPECT_EQ(LlamaConfigToJson(*back), LlamaConfigToJson(*c));
    EXPECT_EQ(back->eos_token_ids, c->eos_token_ids);
    EXPECT_EQ(back->rms_norm_eps, c->rms_norm_eps);
    // What transformers needs to pick the class and build it the same way.
    std::ifstream in(path);
    json j = json::parse(in);
    EXPECT_EQ(j["architectures"], json::array({"LlamaForCausalLM"}));
    EXPECT_EQ(j["model_type"], "llama");
    EXPECT_EQ(j["hidden_act"], "silu");
    EXPECT_EQ(j["attention_bias"], false);
    EXPECT_EQ(j["mlp_bias"], false);
    EXPECT_EQ(j["rope_scaling"]["rope_type"], "llama3");
    EXPECT_EQ(j["eos_token_id"].is_array(), multi_eos);
  }
}

TEST(LlamaConfigTest, SaveRejectsInvalidConfig) {
  LlamaConfig c;  // all sizes zero
  testing::TempDir dir;
  Status s = SaveLlamaConfig(c, dir.Join("config.json"));
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
}

// Reference values: transformers' _compute_default_rope_parameters / _compute_llama3_parameters
// evaluated by hand in f64 (they agree with the f32 torch computation to ~1 ulp).
TEST(RopeTest, DefaultInvFreq) {
  LlamaConfig c;
  c.hidden_size = 64;
  c.num_attention_heads = 4;
  c.head_dim = 16;
  c.rope_theta = 10000.0;
  const std::vector<float> inv = RopeInvFreq(c);
  ASSERT_EQ(inv.size(), 8u);
  for (int i = 0; i < 8; ++i) {
    const double expected = 1.0 / std::pow(10000.0, 2.0 * i / 16.0);
    EXPECT_NEAR(inv[i], expected, 2e-7 * expected) << i;
  }
  EXPECT_EQ(inv[0], 1.0f);
}

TEST(RopeTest, Llama3InvFreq) {
  LlamaConfig c;
  c.hidden_size = 2048;
  c.num_attention_heads = 32;
  c.head_dim = 64;
  c.rope_theta = 500000.0;
  c.rope_scaling = {"llama3", 32.0, 1.0, 4.0, 8192};
  const std::vector<float> inv = RopeInvFreq(c);
  ASSERT_EQ(inv.size(), 32u);
  const double pi = 3.14159265358979323846;
  int kept = 0, scaled = 0, smoothed = 0;
  for (int i = 0; i < 32; ++i) {
    const double f = 1.0 / std::pow(500000.0, 2.0 * i / 64.0);
    const double wavelen = 2 * pi / f;
    double expected;
    if (wavelen < 8192.0 / 4.0) {
      expected = f;
      ++kept;
    } else if (wavelen > 8192.0) {
      expected = f / 32.0;
      ++scaled;
    } else {
      const double s = (8192.0 / wavelen - 1.0) / 3.0;
      expected = (1 - s) * f / 32.0 + s * f;
      ++smoothed;
    }
    EXPECT_NEAR(inv[i], expected, 1e-6 * expected) << i;
  }
  EXPECT_GT(kept, 0);  // the test covers all three bands
  EXPECT_GT(scaled, 0);
  EXPECT_GT(smoothed, 0);
}

}  // namespace
}  // namespace tandem::model
