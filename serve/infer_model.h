// InferModel: the serving forward pass over a model::LlamaModel's weights with a paged KV cache.
//
// One call runs a ragged batch: every sequence contributes a chunk of tokens at consecutive
// positions (a prefill chunk or one decode token); their K/V go into the sequence's pages of the
// unified pool (serve/kv_pool.h's layout) and attention reads all earlier positions through the
// block tables (ops/paged_attention.h). LoRA deltas of several adapters, of any ranks, go through
// the segmented multi-adapter ops (ops/lora.h) over the batch's tokens grouped by adapter. Only
// the last token of each sequence reaches the final norm and lm head: logits [R, V].
//
// The math is LlamaModel's forward (same ops, same order per token): greedy decoding through
// InferModel equals greedy decoding through LlamaModel::Logits on the full sequence.
//
//   TANDEM_ASSIGN_OR_RETURN(auto infer, InferModel::Create(ctx, *model, /*block_tokens=*/16));
//   TANDEM_ASSIGN_OR_RETURN(Tensor logits, infer->Forward(kv_pages, seqs, adapters));
//
// Ownership: keeps references to the context and model (which must outlive it); adapters are
// borrowed per call. Thread-safety: one thread at a time (like the Context).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/status.h"
#include "core/tensor.h"
#include "model/llama.h"
#include "ops/context.h"
#include "ops/lora.h"
#include "peft/lora.h"

namespace tandem::serve {

// One LoRA adapter's weights as the forward reads them: per adapted (layer, projection), A [r, in]
// and B [out, r] in the compute dtype on the compute device, and the scale. Inference needs no
// f32 masters or gradients, so this is all a resident adapter holds on the device.
struct AdapterWeights {
  struct Target {
    Tensor a, b;
    float scale = 1.0f;
  };
  std::vector<int> index;  // [L * 7]: target of (layer, projection), or -1
  std::vector<Target> targets;

  int Find(int64_t layer, model::Projection p) const {
    return index[layer * model::kNumProjections + static_cast<int>(p)];
  }
  // Compute-dtype bytes of every A and B.
  int64_t num_bytes() const;
  // From an adapter on the host (f32): on a CPU context the tensors are shared, on CUDA they are
  // rounded to `dtype` and copied to the device (blocking).
  static StatusOr<AdapterWeights> FromLora(ops::Context& ctx, const peft::LoraAdapter& lora,
                                           DType dtype);
};

struct SeqChunk {
  std::vector<int32_t> tokens;  // the chunk, at positions start .. start + tokens.size() - 1
  int64_t start = 0;
  int32_t adapter = -1;  // index into Forward's adapters, -1 for the base model
  // [L][blocks] page ids of this sequence; blocks * block_tokens >= start + tokens.size().
  const std::vector<std::vector<int32_t>>* blocks = nullptr;
};

class InferModel {
 public:
  static StatusOr<std::unique_ptr<InferModel>> Create(ops::Context& ctx, model::LlamaModel& model,
                                                      int64_t block_tokens);

  int64_t block_tokens() const { return block_tokens_; }
  int64_t num_layers() const { return config_.num_hidden_layers; }
  DType compute_dtype() const { return model_.compute_dtype(); }
  const model::LlamaConfig& config() const { return config_; }
  // Bytes one KV block (block_tokens positions, one layer, K and V) takes.
  int64_t kv_block_bytes() const;

  // Runs the chunks. kv_pages: the pool as [P, page_elems] in the compute dtype. Sequences with
  // the same adapter must be adjacent (the engine sorts them). Returns host f32 logits [R, V] of
  // each sequence's last token.
  StatusOr<Tensor> Forward(Tensor& kv_pages, const std::vector<SeqChunk>& seqs,
                           const std::vector<const AdapterWeights*>& adapters);
  // Forgets cached adapter weight tables (call when an adapter passed before may be freed).
  void ForgetAdapters() {
    lora_adapters_.clear();
    lora_weights_.clear();
  }

 private:
  struct LayerWeights {
    Tensor qkv, o, gate_up, down, attn_norm, mlp_norm;  // qkv [H3 D, C], gate_up [2F, C]
  };
  struct Buffers;

  InferModel(ops::Context& ctx, model::LlamaModel& model, int64_t block_tokens)
      : ctx_(ctx), model_(model), config_(model.config()), block_tokens_(block_tokens) {}
  Status BindWeights();
  Status PrepareLora(const std::vector<SeqChunk>& seqs,
                     const std::vector<const AdapterWeights*>& adapters);
  // y += the adapters' deltas of projection p of layer l (no-op when no adapter targets it).
  Status LoraDelta(int64_t l, model::Projection p, const Tensor& x, Tensor y);
  Status Layer(int64_t l, Buffers& b, Tensor& kv_pages);

  ops::Context& ctx_;
  model::LlamaModel& model_;
  model::LlamaConfig config_;
  int64_t block_tokens_;
  std::vector<LayerWeights> layers_;
  Tensor embed_, final_norm_, lm_head_, inv_freq_;

  // LoRA state of the current batch: weights per (layer, projection), cached while the batch's
  // adapter list stays the same; segments per distinct rank table.
  std::vector<const AdapterWeights*> lora_adapters_;
  std::vector<ops::LoraWeights> lora_weights_;  // [L * 7]
  std::vector<int> lora_segs_index_;            // [L * 7] -> lora_segs_, -1: none
  std::vector<ops::LoraSegments> lora_segs_;
};

}  // namespace tandem::serve
