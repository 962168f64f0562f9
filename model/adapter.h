// AdapterHooks: the interface through which LlamaModel lets an adapter (LoRA, ...) add to its
// linear projections, without the model knowing the adapter. peft/ implements it; the model only
// calls it (the model must not depend on peft).
//
//   peft::AdapterSet adapters(ctx, config);          // implements model::AdapterHooks
//   model->SetAdapter(&adapters);                     // not owned; detach with SetAdapter(nullptr)
//   model->ForwardBackward(batch, scale);             // calls the hooks below
//
// Call order for one batch: BeginBatch; then per layer, after each projection's base GEMM and
// before anything reads its output, ProjectionForward (q, k, v before RoPE; then o; gate, up;
// down). ForwardBackward then runs the blocks backward; per layer, right after the base GEMM that
// wrote a projection's input gradient dx (and before anything reads dx), ProjectionBackward (down;
// gate, up; o; q, k, v after the inverse RoPE). With ModelOptions::recompute a block's
// ProjectionForward calls repeat (same inputs, same order) just before its backward: an adapter
// that keeps state from the forward must accept being called again. ZeroGrads is called by
// LlamaModel::ZeroGrads().
//
// Tensors: x [N, in] and y, dy [N, out] are the model's buffers or column views of its fused
// q|k|v and gate|up outputs (row stride free); N = B * T tokens in row-major batch order. They are
// valid only during the call. Compute dtype (f32 on CPU, bf16 on CUDA); work goes on the model's
// context stream.
//
// Thread-safety: called from the thread that runs the model.
#pragma once

#include <cstdint>

#include "core/status.h"
#include "core/tensor.h"

namespace tandem::model {

struct Batch;

// The seven linear projections of a Llama decoder block.
enum class Projection : uint8_t { kQ = 0, kK, kV, kO, kGate, kUp, kDown };
inline constexpr int kNumProjections = 7;

// HF module names: "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj".
inline const char* ProjectionName(Projection p) {
  constexpr const char* kNames[kNumProjections] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                   "gate_proj", "up_proj", "down_proj"};
  return kNames[static_cast<int>(p)];
}
// The block submodule that holds the projection: "self_attn" or "mlp".
inline const char* ProjectionModule(Projection p) {
  return static_cast<int>(p) <= static_cast<int>(Projection::kO) ? "self_attn" : "mlp";
}

class AdapterHooks {
 public:
  virtual ~AdapterHooks() = default;

  // A batch begins. `training`: a backward pass follows (ForwardBackward), so training-only
  // behaviour such as dropout applies; Loss and Logits pass false. The adapter validates what it
  // reads from the batch (e.g. Batch::adapter_ids); an error aborts the model call.
  virtual Status BeginBatch(const Batch& batch, bool training) = 0;

  // y += the adapter's delta for projection `proj` of block `layer`, whose input is x.
  virtual Status ProjectionForward(int64_t layer, Projection proj, const Tensor& x, Tensor& y) = 0;

  // dy = dL/dy of the projection; dx += the adapter's contribution to dL/dx; the adapter's own
  // weight gradients accumulate. x is the forward input.
  virtual Status ProjectionBackward(int64_t layer, Projection proj, const Tensor& x,
                                    const Tensor& dy, Tensor& dx) = 0;

  // Sets the adapter's gradients to zero.
  virtual Status ZeroGrads() = 0;

  // Whether the adapter runs on a tensor-parallel model (ModelParallel::tp_size > 1): it then
  // holds the slices of its weights that match the base's slices on this rank and does its own
  // tp reductions (peft/adapter_set.h). LlamaModel refuses other adapters under tp.
  virtual bool SupportsTensorParallel() const { return false; }
};

}  // namespace tandem::model
