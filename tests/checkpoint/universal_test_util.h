// A small "model" of tensors with every kind of tensor-parallel split (row slices, column
// slices, fused q|k|v and gate|up, a padded vocabulary, a replicated vector, a 3-d tensor, a
// frozen tensor without moments, adapter tensors), its logical values, and each tp rank's local
// tensors computed here from plain row/column ranges (independently of checkpoint::TpSlices).
#pragma once

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "checkpoint/universal.h"
#include "collectives/communicator.h"
#include "tests/common/testing.h"

namespace tandem::checkpoint::testing {

struct Spec {
  std::string name;
  std::string adapter;
  Shape shape;
  SplitSpec split;
  bool moments = true;
};

inline std::vector<Spec> ModelSpecs() {
  SplitSpec qkv{0, {{"q", 16}, {"k", 8}, {"v", 8}}, false, 0};
  SplitSpec gate_up{0, {{"gate", 12}, {"up", 12}}, false, 0};
  SplitSpec vocab{0, {}, true, 0};
  return {
      {"model.embed_tokens.weight", "", {37, 8}, vocab},
      {"tiny_vocab.weight", "", {5, 4}, vocab},  // under tp 4, rank 3 holds only padding
      {"model.layers.0.self_attn.qkv.weight", "", {32, 8}, qkv},
      {"model.layers.0.self_attn.o_proj.weight", "", {8, 16}, SplitSpec{1}},
      {"model.layers.0.mlp.gate_up.weight", "", {24, 8}, gate_up},
      {"model.layers.0.mlp.down_proj.weight", "", {8, 12}, SplitSpec{1}},
      {"model.norm.weight", "", {8}, SplitSpec{}},
      {"cube", "", {6, 4, 5}, SplitSpec{1}},
      {"frozen.weight", "", {5, 3}, SplitSpec{}, false},
      {"lora_A", "a1", {2, 8}, SplitSpec{}},
      {"lora_B", "a1", {16, 2}, SplitSpec{0}},
  };
}

// Logical values: [which][spec]. which 0 = master, 1 = exp_avg, 2 = exp_avg_sq (> 0).
inline Tensor Logical(const Spec& spec, int which, uint64_t seed) {
  const uint64_t s = seed * 1000 + std::hash<std::string>()(spec.adapter + "/" + spec.name) % 997 +
                     static_cast<uint64_t>(which) * 7919;
  return which == 2 ? ::tandem::testing::RandomUniform(spec.shape, s, 0.0f, 1.0f)
                    : ::tandem::testing::RandomUniform(spec.shape, s);
}

// The ranges [begin, end) along the split dim that tp rank r of t holds, in local order; the
// local extent (padding included) in *local_extent.
inline std::vector<std::pair<int64_t, int64_t>> Ranges(const Spec& spec, int r, int t,
                                                       int64_t* local_extent) {
  const int d = spec.split.tp_dim;
  if (d < 0) {
    *local_extent = spec.shape[0];
    return {{0, spec.shape[0]}};
  }
  const int64_t n = spec.shape[d];
  if (!spec.split.fused.empty()) {
    std::vector<std::pair<int64_t, int64_t>> out;
    int64_t base = 0;
    *local_extent = 0;
    for (const FusedPart& p : spec.split.fused) {
      const int64_t per = p.size / t;
      out.push_back({base + r * per, base + (r + 1) * per});
      base += p.size;
      *local_extent += per;
    }
    return out;
  }
  if (spec.split.vocab_parallel) {
    const int64_t per = (n + t - 1) / t;  // rows padded up to per * t
    *local_extent = per;
    return {{std::min(n, r * per), std::min(n, (r + 1) * per)}};
  }
  *local_extent = n / t;
  return {{r * n / t, (r + 1) * n / t}};
}

// Tp rank r's local tensor of `logical` (padding rows zero), by explicit index arithmetic.
inline Tensor LocalOf(const Spec& spec, const Tensor& logical, int r, int t) {
  int64_t extent = 0;
  const auto ranges = Ranges(spec, r, t, &extent);
  const int d = std::max(spec.split.tp_dim, 0);
  Shape local = spec.shape;
  local[d] = extent;
  Tensor out = Tensor::CpuZeros(local, DType::kF32);
  const float* src = logical.data<float>();
  float* dst = out.data<float>();
  int64_t outer = 1, inner = 1;
  for (int i = 0; i < d; ++i) outer *= spec.shape[i];
  for (size_t i = d + 1; i < spec.shape.size(); ++i) inner *= spec.shape[i];
  int64_t pos = 0;
  for (const auto& [b, e] : ranges) {
    for (int64_t o = 0; o < outer; ++o) {
      for (int64_t k = b; k < e; ++k) {
        std::memcpy(dst + (o * extent + pos + k - b) * inner, src + (o * spec.shape[d] + k) * inner,
                    inner * sizeof(float));
      }
    }
    pos += e - b;
  }
  return out;
}

inline bool SameBytes(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.num_bytes() == b.num_bytes() &&
         std::memcmp(a.raw_data(), b.raw_data(), a.num_bytes()) == 0;
}

// Shards that (dp rank dp_rank, tp rank tp_rank) of a dp x tp mesh gives: dp rank 0 only (the
// others hold replicas); a replicated tensor from tp rank 0 only.
inline std::vector<TensorShard> ShardsOf(int dp_rank, int tp_rank, int tp, uint64_t seed,
                                         int64_t step) {
  std::vector<TensorShard> all;
  if (dp_rank != 0) return all;
  for (const Spec& spec : ModelSpecs()) {
    if (spec.split.tp_dim < 0 && tp_rank != 0) continue;
    const int t = spec.split.tp_dim < 0 ? 1 : tp;
    const int r = spec.split.tp_dim < 0 ? 0 : tp_rank;
    Tensor local[3];
    for (int w = 0; w < (spec.moments ? 3 : 1); ++w) {
      local[w] = LocalOf(spec, Logical(spec, w, seed), r, t);
    }
    auto shards = TpShards(spec.name, spec.shape, spec.split, r, t, local[0], local[1], local[2]);
    EXPECT_TRUE(shards.ok()) << shards.status().ToString();
    if (!shards.ok()) continue;
    for (TensorShard& s : *shards) {
      s.adapter = spec.adapter;
      s.step = step + (spec.adapter.empty() ? 0 : 100);
      s.trainable = spec.moments;
      all.push_back(std::move(s));
    }
  }
  return all;
}

inline UniversalMeta MetaFor(int64_t step, int dp, int tp) {
  UniversalMeta meta;
  meta.step = step;
  meta.config_toml = "[train]\nsteps = 10\n";
  meta.model_config_json = "{}";
  meta.dp = dp;
  meta.tp = tp;
  meta.data_position_json = R"({"epoch": 1, "offset": 12345})";
  meta.rng_state_json = R"({"seed": 7, "counter": 99})";
  meta.adapter_configs["a1"] = R"({"r": 2})";
  return meta;
}

// Checks that tp rank r of t reads exactly LocalOf(...) for every tensor, and the logical tensors.
inline void ExpectReadsMatch(const UniversalReader& reader, int r, int t, uint64_t seed) {
  for (const Spec& spec : ModelSpecs()) {
    auto got = reader.ReadTp(spec.name, r, t, spec.adapter);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    const int tt = spec.split.tp_dim < 0 ? 1 : t;
    const int rr = spec.split.tp_dim < 0 ? 0 : r;
    EXPECT_TRUE(SameBytes(got->master, LocalOf(spec, Logical(spec, 0, seed), rr, tt)))
        << spec.name << " master at tp rank " << r << " of " << t;
    EXPECT_EQ(got->exp_avg.defined(), spec.moments) << spec.name;
    if (spec.moments) {
      EXPECT_TRUE(SameBytes(got->exp_avg, LocalOf(spec, Logical(spec, 1, seed), rr, tt)))
          << spec.name;
      EXPECT_TRUE(SameBytes(got->exp_avg_sq, LocalOf(spec, Logical(spec, 2, seed), rr, tt)))
          << spec.name;
    }
  }
}

}  // namespace tandem::checkpoint::testing
