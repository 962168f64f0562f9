// S²FT: structured sparse fine-tuning (after Yang et al. 2024, "S2FT: Efficient, Scalable and
// Generalizable LLM Fine-tuning by Structured Sparsity") over a frozen tandem Llama base.
//
//   peft::S2ftConfig cfg;                      // 10% of the heads, 10% of the FFN channels
//   TANDEM_ASSIGN_OR_RETURN(auto s2ft, peft::PrepareS2ft(ctx, *model, cfg));  // permutes the base
//   model->SetAdapter(s2ft.get());             // train s2ft->parameters() with AdamW
//   TANDEM_RETURN_IF_ERROR(peft::SaveS2ftAdapter(*s2ft, dir));                   // peft/s2ft_io.h
//
// Selection (per layer, the same counts in every layer). Attention is selected in units of kv
// groups: a group is one kv head and the g = Hq / Hkv query heads that read it (g = 1 without
// GQA), so a permutation that makes the selection contiguous keeps every query head on its kv
// head. FFN channels are selected one by one. Counts:
//   - fractions: groups = round(heads_fraction * Hkv), channels = round(ffn_fraction * F);
//   - budget > 0 (trainable parameters, all layers): per layer b = budget / L; the attention share
//     is b * a / (a + f) with a, f the parameter counts the fractions would give; groups =
//     floor(share / group_cost) (at most Hkv), then channels = floor((b - groups * group_cost) /
//     channel_cost) (at most F), then groups grow by what is left (all channels taken), so the
//     total never exceeds the budget;
//     group_cost = C g D (o columns), with `coupled` C D (2 g + 2) (plus q, k, v rows);
//     channel_cost = C (down column), with `coupled` 3 C (plus gate and up rows).
// Which ones:
//   - "random": per layer l the first n of a Fisher-Yates shuffle drawn from
//     Rng(DeriveSeed(seed, 0, "s2ft_select"), stream = 2 l (groups) or 2 l + 1 (channels));
//   - "weight": the largest scores, ties to the lower index; a group's score is the squared
//     Frobenius norm of its query heads' o_proj input columns, a channel's the squared norm of
//     its down_proj input column (the output projections S²FT trains: the columns that carry the
//     most weight mass).
// Selections are kept in ascending order.
//
// Trained blocks (the output projections always; with `coupled` also the input projections of
// the same heads and channels). For layer l with selected query heads Hs, kv groups Gs and
// channels Cs:
//   o_proj    columns  h D + d for h in Hs      D_o    [C, |Hs| D]
//   down_proj columns  c for c in Cs            D_down [C, |Cs|]
//   q_proj    rows     h D + d for h in Hs      D_q    [|Hs| D, C]     (coupled)
//   k_proj, v_proj rows  G D + d for G in Gs    D_k, D_v [|Gs| D, C]   (coupled)
//   gate_proj, up_proj rows  c for c in Cs      D_gate, D_up [|Cs|, C] (coupled)
// Every block starts at zero. The effective weight is W with W[:, idx] + D (columns) or
// W[idx, :] + D (rows): merging and training the sub-block are the same thing.
//
// Co-permutation. PermuteS2ftBase reorders the base weights of every layer so that its selection
// comes first: kv groups in the order (selected ascending, then the others ascending), each with
// its g query heads (q rows and o columns by head, k and v rows by kv head); FFN channels likewise
// (gate and up rows, down columns). The model computes the same function (only the order of
// independent heads and channels changes). On a permuted base a block is the first s columns
// (rows) of its projection, a contiguous view, and the adapter hooks are
//   columns: y += x[:, :s] D^T;     dD += dy^T x[:, :s];     dx[:, :s] += dy D
//   rows:    y[:, :s] += x D^T;     dD += dy[:, :s]^T x;     dx += dy[:, :s] D
// (partial backpropagation: no base weight gradient, and the block reads only its slice of the
// activations; the model still keeps its usual activations, which the frozen path's input
// gradients need). The hooks are valid ONLY on a base permuted for this adapter's selection;
// UnpermuteS2ftBase restores the original order. Exports always use original indices.
//
// Numerics: CPU f32; on CUDA the compute copies are bf16 with f32 masters and gradients (as LoRA).
// Ownership: the adapter keeps a reference to the Context, which must outlive it.
// Thread-safety: one thread at a time (the model's).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "core/tensor.h"
#include "model/adapter.h"
#include "model/config.h"
#include "model/llama.h"
#include "ops/context.h"

namespace tandem::peft {

struct S2ftConfig {
  double heads_fraction = 0.1;          // of the kv groups per layer, in [0, 1]
  double ffn_fraction = 0.1;            // of the FFN channels per layer, in [0, 1]
  int64_t budget = 0;                   // > 0: trainable parameters in all (see the header)
  std::string selection = "random";     // "random" or "weight"
  bool coupled = false;                 // also q/k/v rows and gate/up rows (see the header)
  uint64_t seed = 0;                    // for "random"
  std::string base_model_name_or_path;  // recorded in s2ft_config.json
};

// What one layer trains: query heads (whole kv groups) and FFN channels, ascending, original
// indices.
struct S2ftLayerSelection {
  std::vector<int64_t> heads;
  std::vector<int64_t> channels;
};

struct S2ftSelection {
  std::vector<S2ftLayerSelection> layers;  // [L]
};

enum class S2ftAxis : uint8_t { kColumns = 0, kRows };
const char* S2ftAxisName(S2ftAxis axis);  // "columns", "rows"

// One trained sub-block of one projection.
struct S2ftBlock {
  int64_t layer = 0;
  model::Projection proj = model::Projection::kO;
  S2ftAxis axis = S2ftAxis::kColumns;
  std::vector<int64_t> indices;  // original columns (rows) of W, ascending
  Shape shape;                   // [out, |indices|] for columns, [|indices|, in] for rows
  std::string name;              // "model.layers.L.self_attn.o_proj.s2ft_delta"
};

// Parameters one kv group / one channel costs in a layer.
int64_t S2ftParamsPerGroup(const model::LlamaConfig& base, bool coupled);
int64_t S2ftParamsPerChannel(const model::LlamaConfig& base, bool coupled);

// Validates config (fractions in [0, 1], budget >= 0, known selection). Errors name the field.
Status ValidateS2ftConfig(const S2ftConfig& config);

// Chooses the heads and channels of every layer (see the header). "weight" reads `base`'s o_proj
// and down_proj weights, which must be in their original order (call before PermuteS2ftBase).
// `base` is only read (on ctx, the model's context).
StatusOr<S2ftSelection> SelectS2ft(ops::Context& ctx, const S2ftConfig& config,
                                   model::LlamaModel& base);

// Checks a selection against an architecture: one entry per layer, indices in range, no
// duplicates, whole kv groups. Sorts each list. `source` prefixes errors (a file name).
Status NormalizeS2ftSelection(S2ftSelection& selection, const model::LlamaConfig& base,
                              const std::string& source);

// The blocks a selection trains, in (layer, projection) order; layers with an empty selection
// for a projection have no block there.
std::vector<S2ftBlock> S2ftBlocksFor(const S2ftSelection& selection, const model::LlamaConfig& base,
                                     bool coupled);

// Reorders the base weights (masters too) so each layer's selection comes first, and back. ctx is
// the model's context.
Status PermuteS2ftBase(ops::Context& ctx, model::LlamaModel& model, const S2ftSelection& selection);
Status UnpermuteS2ftBase(ops::Context& ctx, model::LlamaModel& model,
                         const S2ftSelection& selection);

// Where a model's projections stand relative to the original order.
enum class S2ftBaseOrder : uint8_t { kOriginal = 0, kPermuted };

class S2ftAdapter final : public model::AdapterHooks {
 public:
  ~S2ftAdapter() override;
  S2ftAdapter(const S2ftAdapter&) = delete;
  S2ftAdapter& operator=(const S2ftAdapter&) = delete;

  // Blocks of `selection` (normalized first), all zero, on ctx's device.
  static StatusOr<std::unique_ptr<S2ftAdapter>> Create(ops::Context& ctx,
                                                       const model::LlamaConfig& base,
                                                       const S2ftConfig& config,
                                                       S2ftSelection selection);

  const S2ftConfig& config() const { return config_; }
  const model::LlamaConfig& base_config() const { return base_; }
  const S2ftSelection& selection() const { return selection_; }
  const std::vector<S2ftBlock>& blocks() const { return blocks_; }
  // Index into blocks() of (layer, proj), or -1.
  int Find(int64_t layer, model::Projection proj) const;
  ops::Context& context() const { return ctx_; }
  int64_t num_trainable() const;

  // One parameter per block (blocks() order), named as the block: f32 master, compute copy
  // (weight) and f32 grad; trainable, weight decay on.
  std::vector<model::Parameter>& parameters() { return params_; }
  const std::vector<model::Parameter>& parameters() const { return params_; }
  Status SetFromHost(size_t block, const Tensor& host_f32);
  StatusOr<Tensor> ToHost(size_t block) const;

  // W[:, idx] += D (rows: W[idx, :] += D) for every block; Unmerge subtracts. `order` says how
  // the model's weights are laid out (kPermuted: after PermuteS2ftBase for this selection).
  // Whole matrices go through the host in f32 (their f32 master where the model has one, then
  // re-cast to the compute copy): correct on CPU and CUDA, not a fast path.
  Status Merge(model::LlamaModel& model, S2ftBaseOrder order = S2ftBaseOrder::kOriginal) const;
  Status Unmerge(model::LlamaModel& model, S2ftBaseOrder order = S2ftBaseOrder::kOriginal) const;

  // model::AdapterHooks (the base must be permuted for this selection). An S2FT adapter serves
  // whole batches: batch.adapter_ids, when set, must be all 0 (InvalidArgument otherwise).
  Status BeginBatch(const model::Batch& batch, bool training) override;
  Status ProjectionForward(int64_t layer, model::Projection proj, const Tensor& x,
                           Tensor& y) override;
  Status ProjectionBackward(int64_t layer, model::Projection proj, const Tensor& x,
                            const Tensor& dy, Tensor& dx) override;
  Status ZeroGrads() override;

 private:
  S2ftAdapter(ops::Context& ctx, const model::LlamaConfig& base, const S2ftConfig& config);
  Status Allocate();
  Status AddDelta(model::LlamaModel& model, S2ftBaseOrder order, float sign) const;

  ops::Context& ctx_;
  model::LlamaConfig base_;
  S2ftConfig config_;
  S2ftSelection selection_;
  std::vector<S2ftBlock> blocks_;
  std::vector<int> index_;  // [L * 7]: block index or -1
  std::vector<model::Parameter> params_;
  Tensor master_flat_, weight_flat_, grad_flat_;
};

// The same update as a LoRA adapter on ctx: a columns block D ([out, k]) of W at columns idx is
// B A with A [k, in] one-hot (A[j, idx[j]] = 1) and B = D; a rows block D ([k, in]) at rows idx is
// B A with A = D and B [out, k] one-hot (B[idx[j], j] = 1); every target's scale is 1 (alpha =
// rank = k). Each element of B A has at most one nonzero term, so the update is exact. The
// serving engine loads S2FT adapters this way, so they run through the segmented multi-adapter
// kernels beside LoRA adapters; the one-hot factors cost k x in (or out x k) elements each.
// InvalidArgument for an adapter without blocks.
class LoraAdapter;
StatusOr<std::unique_ptr<LoraAdapter>> S2ftAsLora(ops::Context& ctx, const S2ftAdapter& s2ft);

// Selects (SelectS2ft), creates a zero adapter and permutes `model` for it. The caller attaches
// it (model.SetAdapter) and trains its parameters.
StatusOr<std::unique_ptr<S2ftAdapter>> PrepareS2ft(ops::Context& ctx, model::LlamaModel& model,
                                                   const S2ftConfig& config);

}  // namespace tandem::peft
