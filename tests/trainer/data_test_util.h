// Helpers shared by the data tests: a fake tokenizer, reading a prepared split back through the
// public shard API, and random documents.
#pragma once

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "model/tokenizer.h"
#include "trainer/shard.h"

namespace tandem::trainer::testutil {

using nlohmann::json;

constexpr int32_t kBos = 256, kEos = 257, kStartHeader = 258, kEndHeader = 259, kEot = 260;

// Bytes plus <bos>/<eos>, and Llama-3 header tokens when `llama3`. Special strings in the text
// are matched as special tokens, as the real tokenizers do.
class FakeTokenizer : public model::Tokenizer {
 public:
  explicit FakeTokenizer(bool llama3) : llama3_(llama3) {}
  std::vector<int32_t> Encode(std::string_view text) const override {
    std::vector<int32_t> ids;
    for (size_t i = 0; i < text.size();) {
      bool special = false;
      for (const auto& [name, id] : Specials()) {
        if (text.substr(i, name.size()) == name) {
          ids.push_back(id);
          i += name.size();
          special = true;
          break;
        }
      }
      if (!special) ids.push_back(static_cast<uint8_t>(text[i++]));
    }
    return ids;
  }
  std::string Decode(std::span<const int32_t> ids, bool) const override {
    std::string s;
    for (int32_t id : ids) s += id < 256 ? std::string(1, static_cast<char>(id)) : "<?>";
    return s;
  }
  int64_t vocab_size() const override { return llama3_ ? 261 : 258; }
  std::optional<int32_t> bos_id() const override { return kBos; }
  std::optional<int32_t> eos_id() const override { return kEos; }
  StatusOr<int32_t> TokenId(std::string_view token) const override {
    for (const auto& [name, id] : Specials()) {
      if (token == name) return id;
    }
    return NotFoundError(std::string(token));
  }
  std::string kind() const override { return "fake"; }

 private:
  std::vector<std::pair<std::string, int32_t>> Specials() const {
    std::vector<std::pair<std::string, int32_t>> s = {{"<bos>", kBos}, {"<eos>", kEos}};
    if (llama3_) {
      s.push_back({"<|start_header_id|>", kStartHeader});
      s.push_back({"<|end_header_id|>", kEndHeader});
      s.push_back({"<|eot_id|>", kEot});
    }
    return s;
  }
  bool llama3_;
};

inline void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

// A split read back through the public shard API: the stream, its mask and document starts.
struct SplitData {
  std::vector<int32_t> tokens;
  std::vector<uint8_t> mask;
  std::vector<int64_t> doc_starts;  // merged across shards (continued documents are one)
  int num_shards = 0;
};

inline SplitData ReadSplit(const std::string& dir, const std::string& split) {
  std::ifstream f(dir + "/manifest.json");
  const json m = json::parse(f);
  SplitData out;
  for (const json& entry : m["splits"][split]["shards"]) {
    StatusOr<Shard> s = OpenShard(dir + "/" + entry["file"].get<std::string>());
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    if (!s.ok()) return out;
    const int64_t base = static_cast<int64_t>(out.tokens.size());
    for (size_t d = 0; d + 1 < s->doc_index().size(); ++d) {
      if (d == 0 && s->first_doc_continues()) continue;
      out.doc_starts.push_back(base + static_cast<int64_t>(s->doc_index()[d]));
    }
    for (int64_t i = 0; i < s->num_tokens(); ++i) {
      out.tokens.push_back(s->token(i));
      out.mask.push_back(s->has_loss_mask() ? s->loss_mask()[i] : 1);
    }
    ++out.num_shards;
  }
  return out;
}

inline std::vector<int32_t> Bytes(std::string_view s) {
  std::vector<int32_t> ids;
  for (char c : s) ids.push_back(static_cast<uint8_t>(c));
  return ids;
}

// Appends `ids` with mask `m` to (tokens, mask).
inline void Push(SplitData& e, const std::vector<int32_t>& ids, uint8_t m) {
  e.tokens.insert(e.tokens.end(), ids.begin(), ids.end());
  e.mask.insert(e.mask.end(), ids.size(), m);
}

// n documents "doc <i> <random letters>" as JSONL.
inline std::string RandomDocs(int n, uint64_t seed, int max_len = 40) {
  std::mt19937_64 rng(seed);
  std::string out;
  for (int i = 0; i < n; ++i) {
    std::string text = "doc " + std::to_string(i) + " ";
    const int len = static_cast<int>(rng() % static_cast<uint64_t>(max_len));
    for (int k = 0; k < len; ++k) text += static_cast<char>('a' + rng() % 26);
    out += json({{"text", text}}).dump() + "\n";
  }
  return out;
}

}  // namespace tandem::trainer::testutil
