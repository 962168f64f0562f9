// The serving engine's per-request and per-adapter state (private to serve/engine.cc).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/rng.h"
#include "ops/context.h"
#include "peft/lora.h"
#include "serve/engine.h"
#include "serve/infer_model.h"
#include "serve/internal/text_stream.h"

namespace tandem::serve::internal {

// An adapter in its three tiers: `path` on disk; `host` (f32, its own CPU context) while in the
// host LRU; `device` (compute-dtype A and B only) plus `pages` (charged in the unified pool) while
// resident for decoding. On a CPU engine the device copy shares the host copy's tensors for o
// and down (the fused q/k/v and gate/up sites are new tensors); `weight_bytes` counts the
// device copy as AdapterWeights::BytesFor does, the fused sites' zero blocks included.
struct AdapterEntry {
  std::string name, path;
  peft::LoraConfig config;
  int64_t weight_bytes = 0;  // compute-dtype bytes of A and B over all targets
  std::unique_ptr<ops::Context> host_ctx;
  std::unique_ptr<peft::LoraAdapter> host;
  std::unique_ptr<AdapterWeights> device;
  std::vector<int32_t> pages;  // non-empty iff resident
  int64_t refs = 0;            // admitted (running) requests using it
  uint64_t last_used = 0;      // engine iteration of last use (LRU)
  bool unloaded = false;       // removed by UnloadAdapter; freed when refs reaches 0

  bool resident() const { return !pages.empty(); }
  const AdapterWeights* compute() const { return device.get(); }
};

struct RequestState {
  RequestId id = 0;
  GenerationRequest gen;
  EventCallback on_event;
  std::shared_ptr<AdapterEntry> adapter;  // null for the base model
  std::vector<int32_t> tokens;            // prompt then generated ids
  int64_t num_prompt = 0;
  int64_t computed = 0;                      // leading tokens whose K/V are in the cache
  std::vector<std::vector<int32_t>> blocks;  // [L][blocks] page ids
  Rng rng{0};
  std::unique_ptr<TextStream> text;
  int64_t generated = 0;
  bool admitted_once = false;
  int64_t blocks_held() const { return blocks.empty() ? 0 : blocks[0].size(); }
};

}  // namespace tandem::serve::internal
