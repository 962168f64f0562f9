// LlamaModel: a Llama decoder (HF LlamaForCausalLM) with an explicit forward and backward per
// block, in the style of llm.c: no autograd tape, every activation and gradient buffer named.
//
//   auto ctx = ops::Context::Cpu();
//   TANDEM_ASSIGN_OR_RETURN(auto model, LlamaModel::Create(*ctx, config, ModelOptions{}));
//   TANDEM_RETURN_IF_ERROR(model->LoadSafetensors(model_dir));
//   TANDEM_RETURN_IF_ERROR(model->ZeroGrads());
//   TANDEM_ASSIGN_OR_RETURN(LossSum l, model->ForwardBackward(batch, 1.0f / num_target_tokens));
//   // ... optimizer over model->parameters(): ops::AdamW(master, m, v, weight, grad, ...)
//
// Numerics: on a CPU context everything is f32. On a CUDA context weights and activations are
// bf16 (Parameter::weight) with an f32 master copy (Parameter::master) and f32 gradients;
// RMSNorm statistics, attention log-sum-exp and losses are f32.
//
// Memory layout: all weights live in one flat buffer; each Parameter is a contiguous view in HF
// shape. q/k/v of a layer are adjacent rows of one [(Hq + 2 Hkv) D, C] block and gate/up of one
// [2F, C] block, so one GEMM computes each fused projection; gradients use the same layout in one
// flat f32 buffer. Activations are allocated once per batch shape [B, T] and reused; with
// ModelOptions::recompute only each block's input is kept and the block is recomputed in
// backward (bitwise-identical gradients, since every op is deterministic).
//
// Frozen parameters (trainable == false) get no weight gradient: their dW GEMMs are skipped.
// ZeroGrads() (re)lays out the gradient buffer over the parameter groups (fused q|k|v, gate|up,
// or a single parameter) that hold a trainable parameter; the grads of fully frozen groups become
// undefined and their memory is freed. Change `trainable` flags only before ZeroGrads().
// Zeroing is lazy: ZeroGrads() only marks the gradients, the first write of the next pass
// overwrites each one (a weight-gradient GEMM with beta 0, no fill and no read of the old
// values), and every gradient the pass did not write is zeroed before it is reported final
// (grad-ready callback) and before the pass returns. So between ZeroGrads() and the end of the
// next ForwardBackward the gradient buffers' contents are unspecified.
//
// Ownership: the model keeps a reference to the Context, which must outlive it; tensors it hands
// out (parameters, logits) are its own or fresh host copies.
// Thread-safety: one thread at a time (like the Context).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/status.h"
#include "core/tensor.h"
#include "model/adapter.h"
#include "model/config.h"
#include "ops/context.h"

namespace tandem::model {

namespace internal {
class LayerStream;
}

// Tensor and context parallelism reach the model through this interface, which parallel/
// implements over collectives (model/ must not depend on collectives/, as with AdapterHooks).
// Tensors passed in may live on the host or on the model's device; contiguous, f32 or the
// compute dtype. Every rank of the group makes the same calls in the same order.
class ParallelHooks {
 public:
  virtual ~ParallelHooks() = default;
  // In place sum over the tp group.
  virtual Status TpAllReduceSum(Tensor& inout) = 0;
  // In place max over the tp group.
  virtual Status TpAllReduceMax(Tensor& inout) = 0;
  // out [tp * n] = every tp rank's `in` [n], in tp rank order (same device and dtype as in).
  virtual Status TpAllGather(Tensor& out, const Tensor& in) = 0;
  // Context parallelism: causal attention of this rank's zig-zag token chunks against the whole
  // sequence (shapes and layout of ops::AttentionForward/Backward with T = this rank's Tl tokens;
  // q/k/v/out token stride free). See parallel/ring_attention.h.
  virtual Status CpAttentionForward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                                    const Tensor& v, float scale) = 0;
  virtual Status CpAttentionBackward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout,
                                     const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& out, const Tensor& lse, float scale) = 0;
};

// This rank's place in the tensor- and context-parallel groups (see parallel/mesh.h).
// tp > 1 (Megatron): q heads Hq/tp and kv heads Hkv/tp per rank (a kv head replicated over
// tp/Hkv ranks when Hkv < tp), gate/up F/tp rows, o/down the matching input columns, embedding
// and lm_head rows of the vocabulary padded to a multiple of tp. cp > 1: the batch holds this
// rank's zig-zag chunks of each sequence and Batch::positions their global positions.
struct ModelParallel {
  int tp_rank = 0;
  int tp_size = 1;
  int cp_rank = 0;
  int cp_size = 1;
  ParallelHooks* hooks = nullptr;  // not owned; required when tp_size > 1 or cp_size > 1
};

// [offload] The f32 master weights of a model whose optimizer keeps them off the device
// (ModelOptions::device_master == false): the model hands every parameter's f32 values to it when
// it sets them (InitRandom, LoadSafetensors) and reads them back when it saves, so nothing is lost
// to the compute dtype. Indices are parameters() indices; tensors are host f32 in the parameter's
// local shape. Implemented by the trainer over offload::OffloadedOptimizer.
class HostMasters {
 public:
  virtual ~HostMasters() = default;
  virtual Status SetMaster(size_t param, const Tensor& host_f32) = 0;
  virtual Status GetMaster(size_t param, Tensor& host_f32) = 0;
};

// [offload] Where streamed layers are read from when their host buffer is not the copy source:
// a file the buffer maps (ModelOptions::stream_reader), read with direct I/O so a layer's bytes go
// disk -> pinned staging -> device without passing through the page cache. Read(offset, dst, n)
// fills dst with bytes [offset, offset + n) of the host buffer as last written (layer l starts at
// byte l * E * element size). Called from the layer stream's worker threads, one call at a time;
// dst is host memory of the stream's own. Implemented by the trainer over an offload::Storage.
class LayerReader {
 public:
  virtual ~LayerReader() = default;
  virtual Status Read(uint64_t offset, void* dst, size_t num_bytes) = 0;
};

struct ModelOptions {
  // Keep only each block's input; recompute the block in backward.
  bool recompute = false;
  // false: every parameter starts frozen and no f32 master copy or gradient is allocated (a
  // frozen base for PEFT). Parameters made trainable later get both at the next ZeroGrads().
  bool trainable = true;
  // Tokens per chunk of the loss head: the [N, V] logits of a batch never exist at once.
  int64_t loss_chunk_tokens = 1024;
  // Tensor/context parallel placement (default: one rank holds everything).
  ModelParallel parallel;
  // The flat weight and gradient buffers are padded to a multiple of this many elements (ZeRO
  // shards them into equal parts).
  int64_t flat_numel_multiple = 1;
  // false: no f32 master copy on a CUDA device (Parameter::master stays undefined); the optimizer
  // keeps the masters elsewhere (see HostMasters), or has none and updates the compute-dtype
  // weights in place (the trainer's optimizer.precision = "bf16"). On CPU master and weight are
  // one f32 tensor.
  bool device_master = true;
  // [offload] The decoder layers' weights (compute dtype) live in host memory, page-locked on
  // CUDA; the device holds two layers at a time and copies the next layer in while the current
  // one computes (forward and backward, recompute included). Embedding, final norm and lm_head
  // stay on the device. Parameter::weight of a layer parameter is then a host tensor: updates
  // written there between passes are read by the next pass. weights_flat() is undefined (ZeRO-1
  // cannot shard it), and on CUDA a trainable layer parameter needs device_master == false (its
  // optimizer lives off the device) since no f32 master of it may live on the device.
  bool stream_layers = false;
  // [offload] Where stream_layers' host buffer comes from (host memory; e.g. placed on a NUMA or
  // CXL node, its pages touched there); nullptr: HostAllocator(), touched by the model across the
  // cores. Weights are set (init or load) before any pass reads them either way. Not owned: it must
  // outlive the model.
  Allocator* stream_host_allocator = nullptr;
  // [offload] With stream_layers: layers are read through this reader (e.g. from the NVMe file
  // that stream_host_allocator maps) instead of copied out of the host buffer, which is then not
  // page-locked (its pages may be evicted: models larger than host memory). The buffer stays the
  // weights' home for init, load, save and optimizer writes. Not owned: it must outlive the model.
  LayerReader* stream_reader = nullptr;
};

struct Parameter {
  std::string name;  // HF name, e.g. "model.layers.0.self_attn.q_proj.weight"
  Tensor master;     // f32, the optimizer's copy (on CPU the same tensor as weight; on CUDA
                     // undefined while frozen with ModelOptions::trainable == false, and with
                     // ModelOptions::device_master == false)
  Tensor weight;     // compute dtype (f32 on CPU, bf16 on CUDA), what ops read
  Tensor grad;       // f32, accumulated by ForwardBackward (undefined for frozen groups)
  bool trainable = true;
  bool weight_decay = true;  // false for norms
  // Tensor parallelism: `weight` holds [tp_offset, tp_offset + weight.dim(tp_dim)) of the HF
  // tensor (shape logical_shape) along tp_dim; tp_dim == -1: the whole tensor. Rows past the
  // logical end are vocabulary padding (zero). tp_copies: how many tp ranks hold this same slice
  // (replicated norms: tp; a kv head shared by tp/Hkv ranks: that many; else 1).
  int tp_dim = -1;
  int64_t tp_offset = 0;
  Shape logical_shape;
  int tp_copies = 1;
};

struct Batch {
  Tensor tokens;       // i32 [B, T], host
  Tensor targets;      // i32 [B, T], host, ops::kIgnoreIndex where no loss
  Tensor positions;    // i32 [B, T], host, optional (default 0..T-1 per row)
  Tensor segment_ids;  // i32 [B, T], host, optional (packed documents attend within a segment)
  // [adapter] i32 [B], host, optional: per sequence, the index of the attached adapter that
  // serves it (-1: the base model alone); read by the AdapterHooks (model/adapter.h), an error
  // when no adapter is attached.
  Tensor adapter_ids;
};

struct LossSum {
  double sum = 0;     // sum of token losses (natural log)
  int64_t count = 0;  // number of target tokens (targets != kIgnoreIndex)
};

class LlamaModel {
 public:
  ~LlamaModel();
  LlamaModel(const LlamaModel&) = delete;
  LlamaModel& operator=(const LlamaModel&) = delete;

  // Validates the config and allocates weights (uninitialized), masters and gradients.
  static StatusOr<std::unique_ptr<LlamaModel>> Create(ops::Context& ctx, const LlamaConfig& config,
                                                      const ModelOptions& options);

  // normal(0, std) for linears and embeddings, ones for norms (HF's init). Deterministic and
  // device-independent: element j of parameter i (in parameters() order, row-major) is
  // std * the j-th Rng(seed, /*stream=*/i).Normal() of core/rng.h (Philox, Box-Muller).
  Status InitRandom(uint64_t seed, float std = 0.02f);
  // Under tp > 1 each rank keeps its slice of every tensor.
  // `path`: a model directory (model.safetensors.index.json or model.safetensors), an index file
  // or a .safetensors file. F32/BF16/F16 accepted and converted. Missing, unexpected or
  // mis-shaped tensors are errors naming them (checked before any weight changes). With tied
  // embeddings a stored lm_head.weight is ignored; rotary inv_freq buffers are ignored.
  Status LoadSafetensors(const std::string& path);
  // Writes `dir`/config.json and `dir`/model.safetensors (HF names, from the f32 master where
  // there is one) in `dtype` (f32, bf16 or f16). Creates `dir`. Under tp > 1 a collective over
  // the tp group: every tp rank calls it, tp rank 0 writes the logical (gathered) tensors.
  Status SaveSafetensors(const std::string& dir, DType dtype) const;

  // Mutable access counts as a possible write of the weights (weights_generation() changes).
  std::vector<Parameter>& parameters() {
    ++weights_generation_;
    return params_;
  }
  const std::vector<Parameter>& parameters() const { return params_; }
  // [adapter] Changes whenever the weights may have been written: by InitRandom, LoadSafetensors,
  // or any caller of the non-const parameters() or weights_flat(). An adapter that keeps a copy
  // of frozen base weights (AdapterHooks::ProjectionsForwardWide) refreshes it when this moves.
  uint64_t weights_generation() const { return weights_generation_; }
  const LlamaConfig& config() const { return config_; }
  DType compute_dtype() const { return compute_dtype_; }

  // [adapter] Attaches adapter hooks (model/adapter.h), not owned: they must outlive the model or
  // be detached with SetAdapter(nullptr). Forward and backward then call them for every
  // projection, and ZeroGrads() zeroes their gradients too.
  void SetAdapter(AdapterHooks* adapter) { adapter_ = adapter; }
  AdapterHooks* adapter() const { return adapter_; }

  // Lays out gradients for the trainable groups (see above) and sets them to zero (lazily: they
  // read as zero once the next pass completes, or are that pass's gradients).
  Status ZeroGrads();
  // Forward + backward; grads += d(grad_scale * sum of token losses)/d(param). Returns the loss
  // sum (synchronizes with the device).
  StatusOr<LossSum> ForwardBackward(const Batch& batch, float grad_scale);
  // [co-serving] The same pass in pieces, so that other work on the context (a serving step
  // over these weights) can run between them: BeginForwardBackward validates and uploads the
  // batch; each ContinueForwardBackward enqueues at most `max_units` of the pass's 3L + 1 units
  // (block l's forward, l = 0..L-1, the first with the embedding; the loss head; then for
  // l = L-1..0 block l's MLP backward, with its recompute, and its attention backward, the last
  // with the embedding's backward) and returns true once all are enqueued; FinishForwardBackward
  // then returns the loss sum (synchronizes). ForwardBackward is these three calls. Between pieces
  // the model's weights, adapter and callbacks must stay as they are and no other pass of this
  // model may run; Begin abandons a pass in progress. Continue or Finish without a pass in progress
  // is FailedPrecondition.
  Status BeginForwardBackward(const Batch& batch, float grad_scale);
  StatusOr<bool> ContinueForwardBackward(int64_t max_units);
  StatusOr<LossSum> FinishForwardBackward();
  bool forward_backward_in_progress() const { return fb_.active; }
  // Forward only.
  StatusOr<LossSum> Loss(const Batch& batch);

  // Called during ForwardBackward with parameter indices whose gradients are final for this
  // backward pass (a block's right after its backward), so data parallelism can reduce them
  // while the backward goes on. Empty function: none.
  using GradReadyFn = std::function<Status(const std::vector<size_t>& params)>;
  void SetGradReadyCallback(GradReadyFn fn) { grad_ready_ = std::move(fn); }
  // Called in every forward pass, before the work that reads them is enqueued, with the parameter
  // indices about to be read: the embedding, then each block's, then the final norm and lm_head,
  // so weights still being written (an optimizer's upload on another stream) can be waited for
  // one layer at a time. Empty function: none.
  using WeightsNeededFn = std::function<Status(const std::vector<size_t>& params)>;
  void SetWeightsNeededCallback(WeightsNeededFn fn) { weights_needed_ = std::move(fn); }
  // [offload] Not owned; must outlive its use (nullptr detaches). See HostMasters.
  void SetHostMasters(HostMasters* masters) { host_masters_ = masters; }

  // The whole logical (HF-shaped) f32 host tensor of parameter i: its weight (master where there
  // is one), or its gradient. Under tp > 1 a collective over the tp group (every tp rank calls).
  StatusOr<Tensor> GatherParameter(size_t i, bool grad) const;
  // Every weight, and every gradient (f32), in one flat buffer each, parameters at the offsets
  // of their groups (ZeRO-1 shards these). Gradients are undefined until ZeroGrads(); weights
  // with ModelOptions::stream_layers.
  Tensor& weights_flat() {
    ++weights_generation_;
    return weights_flat_;
  }
  Tensor& grads_flat() { return grads_flat_; }
  // Offset of parameter i's weight in weights_flat() (equal to its grad offset in grads_flat()
  // when every parameter trains).
  int64_t flat_offset(size_t i) const;
  const ModelParallel& parallel() const { return options_.parallel; }
  // [offload] Bytes of layer weights copied host -> device so far (stream_layers; else 0); with
  // stream_reader the bytes read through it.
  int64_t streamed_bytes() const;
  // f32 host [B, T, V] (targets may be undefined), for tests and small generation. Under tp a
  // collective over the tp group (the vocabulary slices are gathered).
  StatusOr<Tensor> Logits(const Batch& batch);

 private:
  struct Layer;        // indices of one decoder block's parameters
  struct Group;        // parameters sharing one contiguous weight/grad range (fused projections)
  struct Activations;  // per-batch-shape buffers (model/internal/llama_state.h)
  struct LayerWeights;  // one layer's weights as the ops read them (ibid.)
  // The two halves of a block's backward, run in this order: the MLP (dres -> d x_mid), then
  // the attention (d x_mid -> d x[layer]).
  enum class BackwardPart : uint8_t { kMlp, kAttention };

  LlamaModel(ops::Context& ctx, const LlamaConfig& config, const ModelOptions& options);

  Status AllocateParameters();
  // [offload] stream_layers: the layer buffers; returns where each group's weights live.
  StatusOr<std::function<Tensor(const Group&)>> AllocateStreamedLayers(int64_t total);
  Status EnsureTrainingState(bool relayout_grads);
  Status SetFromHost(size_t param, const Tensor& host_f32);
  StatusOr<Tensor> ToHostF32(const Tensor& t) const;

  Status EnsureActivations(int64_t batch, int64_t seq, bool backward);
  Status PrepareBatch(const Batch& batch, bool need_targets, bool backward);
  Status Forward();
  Status ForwardStart();                // embedding lookup; the streamed slots forgotten
  Status ForwardLayer(int64_t layer);   // block `layer`'s forward (its weights waited for)
  // Block `layer`'s recompute (before the MLP half) and backward; grads notified after the
  // attention half.
  Status BackwardLayer(int64_t layer, BackwardPart part);
  Status EmbeddingBackward();
  // Layer `layer`'s weights for work enqueued from now on; with stream_layers, layer `next`
  // (-1: none) is copied in meanwhile.
  StatusOr<LayerWeights> WeightsOf(int64_t layer, int64_t next);
  Status BlockForward(int64_t layer, bool write_output, const LayerWeights& w);
  Status BlockBackward(int64_t layer, const LayerWeights& w, BackwardPart part);
  // y = x W^T plus the adapter's deltas of `projs` (y's column blocks at col_start; without an
  // adapter just the GEMM): the adapter writes first where it can
  // (AdapterHooks::ProjectionsForwardFirst) and the GEMM accumulates, else the GEMM writes and the
  // adapter adds.
  // x_wide (defined where the group may take the adapter's wide path, WideGroup): x's buffer
  // with its spare columns, offered first (AdapterHooks::ProjectionsForwardWide).
  Status Project(int64_t layer, std::span<const Projection> projs,
                 std::span<const int64_t> col_start, const Tensor& x, const Tensor& w, Tensor& y,
                 const Tensor& x_wide = Tensor());
  // dx = dy W plus the adapter's contribution to the input gradient (and its weight gradients),
  // in the same order as Project (x_wide and dy_wide: the wide path's buffers, or undefined).
  Status ProjectBackward(int64_t layer, std::span<const Projection> projs,
                         std::span<const int64_t> col_start, const Tensor& x, const Tensor& dy,
                         const Tensor& w, Tensor& dx, const Tensor& x_wide = Tensor(),
                         const Tensor& dy_wide = Tensor());
  // [adapter] Whether group g may take the wide path: its buffers have `spare` columns, an
  // adapter is attached, the layer weights are resident (no stream_layers) and every member is
  // frozen.
  bool WideGroup(int g, int64_t spare) const;
  Status ProjectionGrad(const Group& group, const Tensor& dy, const Tensor& x);
  Status WeightGrad(size_t param, const Tensor& dy, const Tensor& x);
  Status LossHead(float grad_scale, bool backward);
  // tp > 1: cross-entropy of vocabulary-sliced logits [n, V/tp] with targets i32 [n] (global
  // ids, on the device): the rows' (max, sum of exponentials, target logit) are all-gathered over
  // tp; dlogits in place when backward.
  Status VocabParallelCrossEntropy(Tensor& losses, Tensor& logits, const Tensor& targets,
                                   float grad_scale, bool backward);
  // tp > 1 with a kv head replicated over several ranks: the k|v weight gradient of this pass is
  // summed over the ranks sharing the head.
  Status KvProjectionGrad(const Group& group, const Tensor& dy, const Tensor& x);
  Status NotifyGradsReady(const std::vector<size_t>& params);
  // [lazy zero] Parameter i's gradient is about to be accumulated into by a kernel that adds:
  // zero it first if ZeroGrads() left it unwritten.
  Status TouchGrad(size_t i);
  // [lazy zero] The beta of a GEMM about to accumulate into parameter i's gradient: 0 (and the
  // gradient counts as written) when ZeroGrads() left it unwritten, else 1.
  float TakeGradBeta(size_t i);
  Status CheckParallel() const;
  Status GatherOnly() const;  // SaveSafetensors on tp ranks other than 0
  // Host f32 logical tensor -> this rank's slice (zero padding past the logical end), and back.
  Tensor SliceForRank(size_t param, const Tensor& logical) const;
  bool tp() const { return options_.parallel.tp_size > 1; }
  bool cp() const { return options_.parallel.cp_size > 1; }
  StatusOr<LossSum> SumLosses();

  ops::Context& ctx_;
  LlamaConfig config_;
  ModelOptions options_;
  DType compute_dtype_;
  std::vector<Parameter> params_;
  std::vector<Group> groups_;
  std::vector<int> group_of_;  // param index -> group index
  std::vector<Layer> layers_;
  size_t embed_ = 0, final_norm_ = 0, lm_head_ = 0;  // lm_head_ == embed_ when tied
  Tensor weights_flat_;                              // compute dtype, every parameter's weight
  Tensor grads_flat_;                                // f32, the groups with a trainable parameter
  std::vector<bool> grad_layout_;                    // per group: has a gradient in grads_flat_
  std::vector<uint8_t> grad_unwritten_;  // per parameter: zeroed lazily, not written yet
  Tensor inv_freq_;                                  // f32 [D/2] on the device
  std::unique_ptr<Activations> acts_;
  struct PiecewisePass {  // [co-serving] a ForwardBackward in pieces
    bool active = false;
    int64_t next_unit = 0;  // of 3L + 1
    float grad_scale = 1.0f;
  } fb_;
  AdapterHooks* adapter_ = nullptr;  // [adapter] not owned
  uint64_t weights_generation_ = 0;  // [adapter] see weights_generation()
  GradReadyFn grad_ready_;
  WeightsNeededFn weights_needed_;
  HostMasters* host_masters_ = nullptr;  // [offload] not owned
  // This rank's sizes (the config's divided by tp): q and kv heads, ffn width, vocabulary rows
  // (padded), the first vocabulary row and kv head held here, ranks sharing a kv head.
  int64_t hq_ = 0, hkv_ = 0, ffn_ = 0, vocab_rows_ = 0, vocab_start_ = 0, kv_start_ = 0;
  int64_t kv_share_ = 1;
  Tensor kv_grad_scratch_;  // f32 [2 D, C] when kv_share_ > 1
  Tensor kv_grad_gather_;   // f32 [tp * 2 D * C] when kv_share_ > 1: every rank's kv gradient
  // [offload] stream_layers: layer l's groups are elements [l E, (l + 1) E) of the host buffer
  // (E = layer_elems_), at flat offsets from layer_begin_; the other groups live in resident_.
  int64_t layer_begin_ = 0, layer_elems_ = 0;
  Tensor resident_;
  // Declared after params_ so it goes first: the host buffer is unpinned before it is freed.
  std::unique_ptr<internal::LayerStream> stream_;
};

}  // namespace tandem::model
