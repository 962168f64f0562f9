// The BPE model of a byte-level tokenizer: turns one pre-tokenized, byte-mapped word into ids by
// applying merges in rank order, exactly as tokenizers' BPE (Word::merge_all) does.
//
// Thread-safety: Tokenize is const and safe from several threads (the word cache is guarded by a
// shared mutex).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace tandem::model::internal {

// Hashes std::string and std::string_view alike, so maps keyed by string take string_view lookups.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using VocabMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

struct BpeOptions {
  // A word that is itself in the vocabulary becomes that one id, merges or not (Llama-3).
  bool ignore_merges = false;
  // Id for characters missing from the vocabulary; without one they are dropped (as tokenizers).
  std::optional<int32_t> unk_id;
  bool fuse_unk = false;
  // Characters missing from the vocabulary become <0xXX> byte tokens when all of those exist.
  bool byte_fallback = false;
};

class BpeModel {
 public:
  // `merges[r]` is the pair of ids merged with rank r into `merge_results[r]`. Callers validate.
  BpeModel(VocabMap vocab, const std::vector<std::pair<int32_t, int32_t>>& merges,
           const std::vector<int32_t>& merge_results, BpeOptions options);
  BpeModel(const BpeModel&) = delete;
  BpeModel& operator=(const BpeModel&) = delete;

  // Appends the ids of one word (a pre-tokenized piece in the byte-level alphabet).
  void Tokenize(std::string_view word, std::vector<int32_t>* ids) const;

  const VocabMap& vocab() const { return vocab_; }

 private:
  struct Merge {
    int32_t rank;
    int32_t result;
  };
  static uint64_t PairKey(int32_t a, int32_t b) {
    return (uint64_t{static_cast<uint32_t>(a)} << 32) | static_cast<uint32_t>(b);
  }
  // Ids of the word's characters before any merge (unk and byte fallback applied).
  std::vector<int32_t> InitialSymbols(std::string_view word) const;
  void MergeAll(std::vector<int32_t>* symbols) const;

  VocabMap vocab_;
  std::unordered_map<uint64_t, Merge> merges_;
  BpeOptions options_;
  std::vector<int32_t> byte_fallback_ids_;  // 256 ids of <0x00>..<0xFF> when byte_fallback

  // Words up to kMaxCachedWordBytes, at most kMaxCacheEntries of them (then no more are added).
  static constexpr size_t kMaxCachedWordBytes = 256;
  static constexpr size_t kMaxCacheEntries = 1 << 16;
  mutable std::shared_mutex cache_mu_;
  mutable std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>> cache_;
};

}  // namespace tandem::model::internal
