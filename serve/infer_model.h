// InferModel: the serving forward pass over a model::LlamaModel's weights with a paged KV cache.
//
// One call runs a ragged batch: every sequence contributes a chunk of tokens at consecutive
// positions (a prefill chunk or one decode token); their K/V go into the sequence's pages of the
// unified pool (serve/kv_pool.h's layout) and attention reads all earlier positions through the
// block tables (ops/paged_attention.h). LoRA deltas of several adapters, of any ranks, go through
// the segmented multi-adapter ops (ops/lora.h) over the batch's tokens grouped by adapter: one
// shrink and one expand per LoraSite (q|k|v and gate|up fused, see AdapterWeights). Only the last
// token of each sequence reaches the final norm and lm head: logits [R, V].
//
// The math is LlamaModel's forward (same ops, same order per token): greedy decoding through
// InferModel equals greedy decoding through LlamaModel::Logits on the full sequence.
//
//   TANDEM_ASSIGN_OR_RETURN(auto infer, InferModel::Create(ctx, *model, /*block_tokens=*/16));
//   TANDEM_ASSIGN_OR_RETURN(Tensor logits, infer->ForwardLogits(kv_pages, seqs, adapters));
//   TANDEM_ASSIGN_OR_RETURN(auto host, infer->FetchForSampling(logits, {/*rows*/}, vocab));
//   // host.argmax[r]: greedy ids chosen on the device; host.rows: only the rows asked for
//
// Per call the host writes the batch metadata (tokens, positions, KV slots, block tables) into one
// packed staging buffer (pinned on CUDA) that goes to the device in one asynchronous copy; the
// forward never waits for the device. FetchForSampling is the iteration's one synchronization.
//
// CUDA graphs (CUDA contexts, on by default): a decode batch (every chunk one token) whose shape
// was seen before (the same number of sequences, the same adapter segments, the same resident
// adapter list and pool, block tables of the same width rounded up to a power of two) replays a
// CUDA graph of the whole forward (ops/cuda_graph.h) instead of launching its ~300 kernels one by
// one: the second sighting of a shape captures it, later ones replay it after the metadata copy.
// The logits come out the same bit for bit (the same kernels on the same inputs). Graphs are
// dropped when the adapter list or its tables change (ForgetAdapters, a new list); at most
// kMaxGraphs, holding at most kMaxGraphArenaBytes, are kept (least recently used goes). Off while
// a profiler is attached.
//
// Ownership: keeps references to the context and model (which must outlive it); adapters are
// borrowed per call. Thread-safety: one thread at a time (like the Context).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "core/allocator.h"
#include "core/status.h"
#include "core/tensor.h"
#include "model/llama.h"
#include "ops/context.h"
#include "ops/lora.h"
#include "peft/lora.h"

namespace tandem::serve {

// Where the forward adds LoRA deltas in a layer. Projections that read the same input and write
// adjacent columns of one fused output run as one site: q|k|v (input: the normed hidden states,
// output: the fused qkv [N, (Hq + 2 Hkv) D]) and gate|up (output [N, 2F]); o and down are sites
// of their own. One site costs one segmented shrink and one expand per layer.
enum class LoraSite : uint8_t { kQkv = 0, kO, kGateUp, kDown };
inline constexpr int kNumLoraSites = 4;

// The projections of a site, in the order of their output columns.
std::vector<model::Projection> LoraSiteProjections(LoraSite site);
// [in, out] of a site: its projections' shared input and joined outputs.
std::pair<int64_t, int64_t> LoraSiteShape(const model::LlamaConfig& config, LoraSite site);

// One LoRA adapter's weights as the forward reads them: per adapted (layer, site), A [r, in] and
// B [out, r] in the compute dtype on the compute device, and the scale. For a fused site (q|k|v,
// gate|up) they are the adapter's targeted projections of the site joined: A stacks their A rows
// ([r_q + r_k + r_v, in]; an untargeted projection adds none) and B [out_q + out_k + out_v, r] is
// block-diagonal (B_p in the rows of p's output columns and the columns of p's A rows, zeros
// elsewhere), each block multiplied by scale_p / scale (scale: the first nonzero scale of the
// targeted projections; blocks of that scale are exact copies), so that scale * h B^T is the sum
// of the projections' deltas. The zero blocks cost memory: with all seven projections targeted at
// one rank, 1.46x the unfused bytes on TinyLlama-1.1B's shapes, 1.6x on Llama-2-7B's. Inference
// needs no f32 masters or gradients, so this is all a resident adapter holds on the device.
struct AdapterWeights {
  struct Target {
    Tensor a, b;
    float scale = 1.0f;
  };
  std::vector<int> index;  // [L * kNumLoraSites]: target of (layer, site), or -1
  std::vector<Target> targets;

  int Find(int64_t layer, LoraSite s) const {
    return index[layer * kNumLoraSites + static_cast<int>(s)];
  }
  // Compute-dtype bytes of every A and B (fused B blocks' zeros included).
  int64_t num_bytes() const;
  // num_bytes() of FromLora(ctx, lora, dtype), without building it (for memory budgets).
  static int64_t BytesFor(const peft::LoraAdapter& lora, DType dtype);
  // The same from the targets alone (an adapter registered but not read yet).
  static int64_t BytesFor(const model::LlamaConfig& base,
                          const std::vector<peft::LoraTarget>& targets, DType dtype);
  // From an adapter on the host (f32): on a CPU context the tensors of unfused sites are shared
  // and fused sites are new host tensors; on CUDA everything is rounded to `dtype` and copied to
  // the device in one copy (views of one device buffer; waits for the context's stream once).
  // InvalidArgument when a target's shape is not its projection's (e.g. a tensor-parallel slice).
  static StatusOr<AdapterWeights> FromLora(ops::Context& ctx, const peft::LoraAdapter& lora,
                                           DType dtype);

 private:
  Tensor storage_;  // CUDA: the one device buffer every A and B views (moves with the object)
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
  ~InferModel();

  int64_t block_tokens() const { return block_tokens_; }
  int64_t num_layers() const { return config_.num_hidden_layers; }
  DType compute_dtype() const { return model_.compute_dtype(); }
  const model::LlamaConfig& config() const { return config_; }
  // Bytes one KV block (block_tokens positions, one layer, K and V) takes.
  int64_t kv_block_bytes() const;

  // Runs the chunks. kv_pages: the pool as [P, page_elems] in the compute dtype. Sequences with
  // the same adapter must be adjacent (the engine sorts them). Returns the logits of each
  // sequence's last token, [R, V] in the compute dtype on the compute device (enqueued, not
  // waited for).
  StatusOr<Tensor> ForwardLogits(Tensor& kv_pages, const std::vector<SeqChunk>& seqs,
                                 const std::vector<const AdapterWeights*>& adapters);
  // ForwardLogits copied to the host as f32 [R, V] (blocking; tests and tools).
  StatusOr<Tensor> Forward(Tensor& kv_pages, const std::vector<SeqChunk>& seqs,
                           const std::vector<const AdapterWeights*>& adapters);

  struct SamplerInputs {
    std::vector<int32_t> argmax;  // [R] ops::ArgmaxRows over the first `valid` columns
    Tensor rows;                  // host f32 [full_rows.size(), V], in full_rows order
  };
  // What the host sampler needs from ForwardLogits' logits [R, V], with one synchronization: every
  // row's greedy id, chosen on the device (ops::ArgmaxRows; kArgmaxInvalidRow for a row with a
  // NaN or +inf, or only -inf), and the whole row only for `full_rows` (temperature sampling,
  // logprobs). Copies R ids plus those rows instead of every row.
  StatusOr<SamplerInputs> FetchForSampling(const Tensor& logits,
                                           const std::vector<int64_t>& full_rows, int64_t valid);
  // Forgets cached adapter weight tables and the CUDA graphs that read them (call when an adapter
  // passed before may be freed).
  void ForgetAdapters();
  // How many times the per-(layer, site) LoRA weight tables were built: once per distinct
  // adapter list passed to Forward (consecutive calls with the same list reuse them).
  int64_t lora_table_builds() const { return lora_table_builds_; }

  // CUDA graphs for decode batches (see the top of this file); turning them off drops those kept.
  void set_cuda_graphs(bool on);
  bool cuda_graphs() const { return graphs_on_; }
  static constexpr int kMaxGraphs = 32;
  // Device bytes all kept graphs' arenas may hold (activations of their shapes; outside the
  // engine's page pool, like the eager forward's temporaries).
  static constexpr int64_t kMaxGraphArenaBytes = int64_t{1} << 30;
  struct GraphStats {
    int64_t captures = 0;     // graphs captured
    int64_t replays = 0;      // forwards that ran as a graph replay (the capturing call included)
    int64_t kept = 0;         // graphs held now
    int64_t arena_bytes = 0;  // device bytes those graphs hold
  };
  GraphStats graph_stats() const;

 private:
  struct LayerWeights {
    Tensor qkv, o, gate_up, down, attn_norm, mlp_norm;  // qkv [H3 D, C], gate_up [2F, C]
  };
  struct Buffers;
  struct DecodeGraph;

  InferModel(ops::Context& ctx, model::LlamaModel& model, int64_t block_tokens);
  Status BindWeights();
  Status PrepareLora(const std::vector<SeqChunk>& seqs,
                     const std::vector<const AdapterWeights*>& adapters);
  Status BuildLoraTables(const std::vector<const AdapterWeights*>& adapters);
  // BuildLoraTables unless the tables are already over this list.
  Status EnsureLoraTables(const std::vector<const AdapterWeights*>& adapters);
  // y += the adapters' deltas of site s of layer l (no-op when no adapter targets it).
  Status LoraDelta(int64_t l, LoraSite s, const Tensor& x, Tensor y);
  Status Layer(int64_t l, Buffers& b, Tensor& kv_pages);
  // The forward after the metadata is on the device: activations (allocated here), every layer,
  // and the last tokens' logits [R, V].
  Status Compute(Buffers& b, Tensor& kv_pages, const Tensor& tokens, const Tensor& last,
                 Tensor* logits);
  // Packs the batch metadata into the staging buffer and sends it to the device (one copy) into
  // *device when it is defined (a graph's fixed buffer of the right size), else a new tensor.
  Status UploadMetadata(const std::vector<SeqChunk>& seqs, Buffers& b, Tensor* tokens, Tensor* last,
                        Tensor* device);
  // The forward of a decode batch as a CUDA graph replay (capturing it first on the shape's
  // second sighting). False when this call should run eagerly instead.
  StatusOr<bool> GraphForward(Tensor& kv_pages, const std::vector<SeqChunk>& seqs,
                              const std::vector<const AdapterWeights*>& adapters, Buffers& b,
                              Tensor* logits);
  void DropGraphs();
  // A host buffer of at least num_bytes (pinned on CUDA), grown by doubling; *buffer keeps it.
  Status EnsureHost(Tensor* buffer, int64_t num_bytes);

  ops::Context& ctx_;
  model::LlamaModel& model_;
  model::LlamaConfig config_;
  int64_t block_tokens_;
  std::vector<LayerWeights> layers_;
  Tensor embed_, final_norm_, lm_head_, inv_freq_;
  // CUDA: page-locked host memory for the metadata upload and the sampler's downloads.
  std::unique_ptr<Allocator> pinned_;
  Tensor staging_;  // u8, the packed metadata of the last call (its copy may be in flight)
  Tensor fetch_;    // u8, FetchForSampling's download buffer
  bool upload_pending_ = false;  // staging_ may still be read by a queued copy

  // LoRA tables: weights per (layer, site) over every adapter of the list passed (cached
  // while the list stays the same), grouped by rank table (the ranks of all adapters there);
  // this batch's segments per group that some segment uses.
  std::vector<const AdapterWeights*> lora_adapters_;
  std::vector<ops::LoraWeights> lora_weights_;  // [L * kNumLoraSites]
  std::vector<int> lora_group_;                 // [L * sites] -> lora_group_ranks_, -1: none
  std::vector<std::vector<int32_t>> lora_group_ranks_;
  std::vector<int> lora_segs_index_;  // [L * sites] -> lora_segs_, -1: none
  std::vector<ops::LoraSegments> lora_segs_;
  int64_t lora_table_builds_ = 0;

  // CUDA graphs of decode shapes (key: see GraphForward), and how often uncaptured shapes were
  // seen (cleared when it grows past a bound).
  bool graphs_on_ = true;
  bool graphs_broken_ = false;  // a capture failed: eager from then on (reported once)
  std::map<std::vector<int64_t>, std::unique_ptr<DecodeGraph>> graphs_;
  std::map<std::vector<int64_t>, int> graph_sightings_;
  uint64_t graph_clock_ = 0;
  GraphStats graph_stats_;
};

}  // namespace tandem::serve
