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
// down), unless ProjectionsForwardFirst took the group before its base GEMM (below).
// ForwardBackward then runs the blocks backward; per layer, right after the base GEMM that wrote a
// projection's input gradient dx (and before anything reads dx), ProjectionBackward (down; gate,
// up; o; q, k, v after the inverse RoPE). With ModelOptions::recompute a block's ProjectionForward
// calls repeat (same inputs, same order) just before its backward: an adapter that keeps state from
// the forward must accept being called again. ZeroGrads is called by LlamaModel::ZeroGrads().
//
// Tensors: x [N, in] and y, dy [N, out] are the model's buffers or column views of its fused
// q|k|v and gate|up outputs (row stride free); N = B * T tokens in row-major batch order. They are
// valid only during the call. Compute dtype (f32 on CPU, bf16 on CUDA); work goes on the model's
// context stream.
//
// Thread-safety: called from the thread that runs the model.
#pragma once

#include <cstdint>
#include <span>

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

  // Optional fast path, offered before the base GEMM of projections that read the same input x
  // and write adjacent column blocks of one output y (q|k|v, gate|up, or a single projection):
  // projs[m] owns y's columns [col_start[m], col_start[m + 1]). Returning true means the adapter
  // wrote y = its deltas (every element) and the model's base GEMM then adds x W^T onto y, which
  // saves a read and a write of y per projection; false means it wrote nothing, and the model runs
  // the base GEMM and then ProjectionForward per member. The default returns false.
  virtual StatusOr<bool> ProjectionsForwardFirst(int64_t layer, std::span<const Projection> projs,
                                                 std::span<const int64_t> col_start,
                                                 const Tensor& x, Tensor& y) {
    (void)layer, (void)projs, (void)col_start, (void)x, (void)y;
    return false;
  }
  // The backward of the same group, before the base input-gradient GEMM: true means the adapter
  // wrote dx = its contribution to dL/dx (the base GEMM then adds dy W onto dx) and accumulated
  // its weight gradients; false means it did nothing, and ProjectionBackward per member follows
  // the base GEMM. An adapter that took the fast path forward must take it backward too.
  virtual StatusOr<bool> ProjectionsBackwardFirst(int64_t layer, std::span<const Projection> projs,
                                                  std::span<const int64_t> col_start,
                                                  const Tensor& x, const Tensor& dy, Tensor& dx) {
    (void)layer, (void)projs, (void)col_start, (void)x, (void)dy, (void)dx;
    return false;
  }

  // Optional wider fast path, offered before ProjectionsForwardFirst for every group (q|k|v, o,
  // gate|up; down too unless blocks are recomputed, whose repeat stops before it) when the
  // group's base weights are frozen and resident (no layer streaming). The model keeps
  // WideColumns(projs) spare columns after the group's input x and after its output gradient dy
  // (o and down share dy: the residual gradient), so the adapter can put its low-rank activations
  // beside them and fold its product into the base GEMM's inner dimension: y = [x | s h] [W | B]^T
  // and dx = [dy | s dy B] [W ; A], with no expand and no read-back of y or dx. WideColumns: the
  // most spare columns the adapter can use for this group (0: none, the default). The model asks at
  // every batch and widens its buffers when the answer grows.
  virtual int64_t WideColumns(std::span<const Projection> projs) const {
    (void)projs;
    return 0;
  }
  // x_wide [N, in + E]: its first `in` columns hold the input, the rest are the adapter's. w the
  // group's frozen base weight [out, in]; weights_generation changes whenever the model's weights
  // may have been written (LlamaModel::weights_generation), so an adapter that keeps a copy of w
  // knows when to refresh it. True: the adapter wrote y = x W^T + its deltas (every element);
  // false: it wrote nothing and the model goes on with ProjectionsForwardFirst.
  virtual StatusOr<bool> ProjectionsForwardWide(int64_t layer, std::span<const Projection> projs,
                                                std::span<const int64_t> col_start,
                                                const Tensor& x_wide, int64_t in, const Tensor& w,
                                                uint64_t weights_generation, Tensor& y) {
    (void)layer, (void)projs, (void)col_start, (void)x_wide, (void)in, (void)w,
        (void)weights_generation, (void)y;
    return false;
  }
  // The backward of the same group: dy_wide [N, out + E], its first `out` columns dy, the rest
  // the adapter's scratch. True: dx = dy W + the adapter's part written, its weight gradients
  // accumulated. An adapter that took the wide path forward must take it backward.
  virtual StatusOr<bool> ProjectionsBackwardWide(int64_t layer, std::span<const Projection> projs,
                                                 std::span<const int64_t> col_start,
                                                 const Tensor& x_wide, int64_t in,
                                                 const Tensor& dy_wide, const Tensor& w,
                                                 uint64_t weights_generation, Tensor& dx) {
    (void)layer, (void)projs, (void)col_start, (void)x_wide, (void)in, (void)dy_wide, (void)w,
        (void)weights_generation, (void)dx;
    return false;
  }

  // The backward pass reached its last adapter call (after block 0's backward, before the
  // embedding gradient): an adapter that queued work elsewhere makes the model's stream wait for
  // it here, so everything after the pass (gradient norms, the optimizer) sees its gradients.
  virtual Status EndBackward() { return Status::Ok(); }

  // Sets the adapter's gradients to zero.
  virtual Status ZeroGrads() = 0;

  // Whether the adapter runs on a tensor-parallel model (ModelParallel::tp_size > 1): it then
  // holds the slices of its weights that match the base's slices on this rank and does its own
  // tp reductions (peft/adapter_set.h). LlamaModel refuses other adapters under tp.
  virtual bool SupportsTensorParallel() const { return false; }
};

}  // namespace tandem::model
