#include "model/internal/tokenizer_bpe.h"

#include <cstdio>
#include <mutex>
#include <queue>

#include "model/internal/tokenizer_unicode.h"

namespace tandem::model::internal {

BpeModel::BpeModel(VocabMap vocab, const std::vector<std::pair<int32_t, int32_t>>& merges,
                   const std::vector<int32_t>& merge_results, BpeOptions options)
    : vocab_(std::move(vocab)), options_(options) {
  merges_.reserve(merges.size());
  for (size_t r = 0; r < merges.size(); ++r) {
    // A repeated pair takes its last rank, as tokenizers' map construction does.
    merges_[PairKey(merges[r].first, merges[r].second)] =
        Merge{static_cast<int32_t>(r), merge_results[r]};
  }
  if (options_.byte_fallback) {
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof(name), "<0x%02X>", b);
      auto it = vocab_.find(std::string_view(name));
      byte_fallback_ids_.push_back(it == vocab_.end() ? -1 : it->second);
    }
  }
}

std::vector<int32_t> BpeModel::InitialSymbols(std::string_view word) const {
  std::vector<int32_t> symbols;
  symbols.reserve(word.size());
  int32_t pending_unk = -1;  // an unknown character (run, with fuse_unk) not yet emitted
  for (size_t i = 0; i < word.size();) {
    const uint32_t len = DecodeUtf8(word, i).len;
    const std::string_view ch = word.substr(i, len);
    i += len;
    if (auto it = vocab_.find(ch); it != vocab_.end()) {
      if (pending_unk >= 0) symbols.push_back(pending_unk);
      pending_unk = -1;
      symbols.push_back(it->second);
      continue;
    }
    if (options_.byte_fallback) {
      bool all_known = true;
      for (char b : ch) all_known = all_known && byte_fallback_ids_[static_cast<uint8_t>(b)] >= 0;
      if (all_known) {
        for (char b : ch) symbols.push_back(byte_fallback_ids_[static_cast<uint8_t>(b)]);
        continue;
      }
    }
    if (options_.unk_id) {
      if (pending_unk >= 0 && !options_.fuse_unk) symbols.push_back(pending_unk);
      pending_unk = *options_.unk_id;
    }
  }
  if (pending_unk >= 0) symbols.push_back(pending_unk);
  return symbols;
}

void BpeModel::MergeAll(std::vector<int32_t>* ids) const {
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;  // -1 at the ends
    bool alive;
  };
  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t result;
    // Lowest rank first, then leftmost.
    bool operator<(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  const int32_t n = static_cast<int32_t>(ids->size());
  std::vector<Symbol> sym(n);
  for (int32_t i = 0; i < n; ++i) sym[i] = {(*ids)[i], i - 1, i + 1 < n ? i + 1 : -1, true};

  std::priority_queue<Candidate> queue;
  auto push_pair = [&](int32_t left) {
    const int32_t right = sym[left].next;
    if (right < 0) return;
    auto it = merges_.find(PairKey(sym[left].id, sym[right].id));
    if (it != merges_.end()) queue.push({it->second.rank, left, it->second.result});
  };
  for (int32_t i = 0; i + 1 < n; ++i) push_pair(i);

  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = sym[top.pos];
    if (!left.alive || left.next < 0) continue;
    // Skip stale candidates: the pair at this position must still merge into the same token.
    auto it = merges_.find(PairKey(left.id, sym[left.next].id));
    if (it == merges_.end() || it->second.result != top.result) continue;
    Symbol& right = sym[left.next];
    left.id = top.result;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) sym[right.next].prev = top.pos;
    if (left.prev >= 0) push_pair(left.prev);
    push_pair(top.pos);
  }
  ids->clear();
  for (const Symbol& s : sym) {
    if (s.alive) ids->push_back(s.id);
  }
}

void BpeModel::Tokenize(std::string_view word, std::vector<int32_t>* ids) const {
  if (word.empty()) return;
  if (options_.ignore_merges) {
    if (auto it = vocab_.find(word); it != vocab_.end()) {
      ids->push_back(it->second);
      return;
    }
  }
  const bool cacheable = word.size() < kMaxCachedWordBytes;
  if (cacheable) {
    std::shared_lock lock(cache_mu_);
    if (auto it = cache_.find(word); it != cache_.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> symbols = InitialSymbols(word);
  MergeAll(&symbols);
  ids->insert(ids->end(), symbols.begin(), symbols.end());
  if (cacheable) {
    std::unique_lock lock(cache_mu_);
    if (cache_.size() < kMaxCacheEntries) cache_.emplace(std::string(word), std::move(symbols));
  }
}

}  // namespace tandem::model::internal
