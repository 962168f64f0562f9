// LoRA (Hu et al. 2021) for tandem's Llama model, numerically as HF PEFT's LoraModel:
//   y = x W^T + scale * dropout(x) A^T B^T,   A [r, in], B [out, r],
//   scale = alpha / r, or alpha / sqrt(r) with use_rslora.
//
//   peft::LoraConfig cfg;
//   cfg.r = 16; cfg.alpha = 32; cfg.target_modules = {"all-linear"};
//   TANDEM_ASSIGN_OR_RETURN(auto adapter, peft::LoraAdapter::Create(ctx, model->config(), cfg));
//   peft::AdapterSet set(ctx, model->config());       // peft/adapter_set.h
//   TANDEM_ASSIGN_OR_RETURN(int id, set.Add(std::move(adapter)));
//   model->SetAdapter(&set);                           // the base: ModelOptions::trainable = false
//   // train set.adapter(id).parameters() with the usual AdamW loop.
//
// Targets. `target_modules` entries name modules of the base model as PEFT does: an entry E
// selects module M ("model.layers.3.self_attn.q_proj") when M == E or M ends with "." + E. The
// seven projections are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; tandem also
// accepts the short names q, k, v, o, gate, up, down (stored as the _proj names) and "all-linear"
// (all seven in every layer, as PEFT, which never adapts lm_head). An entry that selects nothing
// is an error.
//
// rank_pattern / alpha_pattern: per-module overrides keyed like PEFT's. PEFT matches a key K
// against a module name M with the regex (.*\.)?(K)$ and takes the first key (in the file's order)
// that matches. tandem does the same without regexes: K matches M when M == K or M ends with
// "." + K, first key in order wins; a key starting with '^' must equal the whole module name (as
// the anchored regex would) and a trailing '$' is ignored; keys with other regex syntax (any of
// *+?()[]{}|^$\ elsewhere) are rejected as Unimplemented.
//
// Initialization (PEFT's init_lora_weights=True): A uniform in [-1/sqrt(in), 1/sqrt(in)) (PyTorch's
// kaiming_uniform_ with a = sqrt(5)), B = 0, so a fresh adapter leaves the model unchanged.
// Deterministic and device-independent: element j of A for (layer l, projection p) is
//   bound * (2 u - 1), u the j-th Uniform() of Rng(DeriveSeed(init_seed, 0, "lora_init"),
//   /*stream=*/l * 7 + p)       (core/rng.h; p in model::Projection order)
// so a module's initial A does not depend on which other modules are targeted.
//
// Tensor parallelism (LoraParallel::tp_size > 1) splits each adapter the way LlamaModel splits
// its base layer (model/llama.h, Megatron): column-parallel projections (q, k, v, gate, up) keep
// the whole A [r, in] on every tp rank (identical initial values) and the rows of B [out, r] of
// this rank's heads or ffn channels (a kv head replicated over tp / Hkv ranks keeps its rows on
// each of them); row-parallel projections (o, down) keep the columns of A of this rank's input
// slice and the whole B. Parameters carry the model's tp metadata (tp_dim, tp_offset,
// logical_shape, tp_copies), so gradient norms, universal checkpoints and saving treat them as
// the base's. AdapterSet (peft/adapter_set.h) does the tp reductions of their gradients.
//
// Numerics and memory: on a CPU context everything is f32 and master == weight. On CUDA the
// compute copies (Parameter::weight) are bf16, the masters and gradients f32 (as the model).
//
// Ownership: a LoraAdapter keeps a reference to the Context, which must outlive it.
// Thread-safety: one thread at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/status.h"
#include "core/tensor.h"
#include "model/adapter.h"
#include "model/config.h"
#include "model/llama.h"
#include "ops/context.h"

namespace tandem::peft {

struct LoraConfig {
  int64_t r = 8;                                                   // rank (PEFT "r")
  double alpha = 8.0;                                              // PEFT "lora_alpha"
  double dropout = 0.0;                                            // on the adapter input, [0, 1)
  std::vector<std::string> target_modules = {"q_proj", "v_proj"};  // see the header comment
  bool use_rslora = false;                                         // scale alpha / sqrt(r)
  std::vector<std::pair<std::string, int64_t>> rank_pattern;       // key -> r, first match wins
  std::vector<std::pair<std::string, double>> alpha_pattern;       // key -> alpha, first match wins
  uint64_t init_seed = 0;                                          // A's initialization
  std::string base_model_name_or_path;  // recorded in adapter_config.json
};

// Where a rank stands in the mesh (parallel/mesh.h) as far as adapters care. tp: how adapters are
// sliced (see the header). dp and cp: where this rank's batch lies in the global batch, so that
// AdapterSet's dropout masks are those of the whole batch (a mesh run then equals a one-rank run
// of the global batch): the local sequences are rows [dp_rank B, (dp_rank + 1) B) of the global
// batch, and with cp_size > 1 each holds the zig-zag chunks cp_rank and 2 cp_size - 1 - cp_rank of
// its 2 cp_size equal chunks (parallel/ring_attention.h).
struct LoraParallel {
  int tp_rank = 0;
  int tp_size = 1;
  model::ParallelHooks* hooks = nullptr;  // not owned; required when tp_size > 1
  int dp_rank = 0;
  int cp_rank = 0;
  int cp_size = 1;
};

// One projection's adapter on one tp rank: A is [r, in] here, B [out, r].
struct LoraSlice {
  int64_t in = 0, out = 0;
  bool row_parallel = false;  // o, down: A holds input columns [in_offset, in_offset + in)
  int64_t in_offset = 0;
  int64_t out_offset = 0;  // column parallel: B holds output rows [out_offset, out_offset + out)
  int out_copies = 1;      // tp ranks holding these B rows (a replicated kv head: tp / Hkv)
};

// The slice of projection `proj` held by tp rank `tp_rank` of `tp_size`. InvalidArgument when the
// base cannot be split so (as LlamaModel::Create's check).
StatusOr<LoraSlice> LoraSliceFor(const model::LlamaConfig& base, model::Projection proj,
                                 int tp_rank, int tp_size);

// One adapted projection, resolved from a LoraConfig against a base model.
struct LoraTarget {
  int64_t layer = 0;
  model::Projection proj = model::Projection::kQ;
  std::string module;  // "model.layers.<layer>.<self_attn|mlp>.<proj>"
  int64_t rank = 0;
  double alpha = 0.0;
  float scale = 0.0f;  // alpha / rank, or alpha / sqrt(rank) with rsLoRA
  int64_t in = 0, out = 0;
};

// PEFT's tensor name of a target's factor: "base_model.model.<module>.lora_A.weight" (or lora_B).
std::string LoraParameterName(const LoraTarget& target, bool b);

// "model.layers.<layer>.self_attn.q_proj" (HF module name of a projection).
std::string ProjectionModuleName(int64_t layer, model::Projection proj);
// [in, out] of a projection of `base`.
std::pair<int64_t, int64_t> ProjectionShape(const model::LlamaConfig& base, model::Projection proj);

// Validates `config` (rank > 0, finite alpha, dropout in [0, 1), known and matching target
// entries, pattern keys) and lists its targets in (layer, projection) order. Errors name the
// offending field and value.
StatusOr<std::vector<LoraTarget>> ResolveLoraTargets(const LoraConfig& config,
                                                     const model::LlamaConfig& base);

class LoraAdapter {
 public:
  ~LoraAdapter();
  LoraAdapter(const LoraAdapter&) = delete;
  LoraAdapter& operator=(const LoraAdapter&) = delete;

  // Resolves the config against `base`, allocates masters, compute copies and gradients on ctx's
  // device and initializes them as PEFT does (see the header) from config.init_seed. Under
  // parallel.tp_size > 1 this rank's slices only (every tp rank calls it).
  static StatusOr<std::unique_ptr<LoraAdapter>> Create(ops::Context& ctx,
                                                       const model::LlamaConfig& base,
                                                       const LoraConfig& config,
                                                       const LoraParallel& parallel = {});

  const LoraConfig& config() const { return config_; }
  const model::LlamaConfig& base_config() const { return base_; }
  const std::vector<LoraTarget>& targets() const { return targets_; }
  // Index into targets() of (layer, proj), or -1 when that projection is not adapted.
  int Find(int64_t layer, model::Projection proj) const;
  DType compute_dtype() const { return compute_dtype_; }
  ops::Context& context() const { return ctx_; }
  const LoraParallel& parallel() const { return parallel_; }
  // This rank's slice of target i (the whole adapter when tp_size == 1).
  const LoraSlice& slice(int target) const { return slices_[target]; }

  // Two parameters per target, in targets() order: parameters()[2 i] is A
  // ("base_model.model.<module>.lora_A.weight", [r, in]) and [2 i + 1] is B (".lora_B.weight",
  // [out, r]); the names are PEFT's file names. Trainable, weight decay on. An optimizer updates
  // master and writes the compute copy (weight), as for model parameters.
  std::vector<model::Parameter>& parameters() { return params_; }
  const std::vector<model::Parameter>& parameters() const { return params_; }
  const model::Parameter& a(int target) const { return params_[2 * target]; }
  const model::Parameter& b(int target) const { return params_[2 * target + 1]; }

  // A uniform as PEFT, B zero (see the header).
  Status InitPeft(uint64_t seed);
  // Sets one parameter from a host f32 tensor of its (local) shape (master and compute copy).
  Status SetFromHost(size_t param, const Tensor& host_f32);
  // Sets one parameter from a host f32 tensor of its logical (PEFT) shape: this rank's slice.
  Status SetFromLogicalHost(size_t param, const Tensor& host_f32);
  // Host f32 copy of a parameter's master (this rank's slice).
  StatusOr<Tensor> ToHost(size_t param) const;
  // Host f32 copy of the whole (logical) parameter (its master, or its gradient with `grad`),
  // gathered from the tp ranks: under tp_size > 1 a collective over the tp group for sliced
  // parameters (every tp rank calls it, in the same parameter order); the local copy otherwise.
  StatusOr<Tensor> GatherToHost(size_t param, bool grad = false) const;
  // Zeroes every gradient.
  Status ZeroGrads();

  // W += scale * B A (Merge) or W -= scale * B A (Unmerge) for every target, in the model's f32
  // (under tp each rank its slice of W: B_local A or B A_local)
  // masters where it has them (then re-cast to its compute copies), else in its weights. The model
  // must have the adapter's base architecture. Unmerge undoes Merge up to rounding: exactly in
  // f32 arithmetic terms on CPU (W + d - d), and only to bf16 precision for a bf16 base without
  // masters (a frozen CUDA base), where W itself is rounded after each step.
  Status Merge(model::LlamaModel& model) const;
  Status Unmerge(model::LlamaModel& model) const;

 private:
  LoraAdapter(ops::Context& ctx, const model::LlamaConfig& base, const LoraConfig& config,
              const LoraParallel& parallel);
  Status Allocate();
  Status AddDelta(model::LlamaModel& model, float sign) const;

  ops::Context& ctx_;
  model::LlamaConfig base_;
  LoraConfig config_;
  DType compute_dtype_;
  LoraParallel parallel_;
  std::vector<LoraTarget> targets_;
  std::vector<LoraSlice> slices_;  // per target
  std::vector<int> index_;         // [L * 7]: target index or -1
  std::vector<model::Parameter> params_;
  Tensor master_flat_;  // f32, every master
  Tensor weight_flat_;  // compute dtype (the same tensor as master_flat_ on CPU)
  Tensor grad_flat_;    // f32
};

}  // namespace tandem::peft
