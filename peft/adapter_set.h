// AdapterSet: several LoRA adapters over one base model, serving one batch together. Implements
// model::AdapterHooks, so LlamaModel's forward and backward add each sequence's adapter deltas:
//
//   peft::AdapterSet set(ctx, model->config());
//   TANDEM_ASSIGN_OR_RETURN(int a, set.Add(std::move(adapter_a)));   // 0
//   TANDEM_ASSIGN_OR_RETURN(int b, set.Add(std::move(adapter_b)));   // 1
//   model->SetAdapter(&set);
//   batch.adapter_ids = ...;  // i32 [B] on the host: a, b or -1 (base model) per sequence
//   model->ForwardBackward(batch, scale);  // grads of every adapter that served a sequence
//
// Batch metadata: sequence b's tokens are rows [b T, (b + 1) T) of the model's [N, C]
// activations; runs of consecutive sequences with the same adapter id become one segment. Without
// Batch::adapter_ids every sequence uses default_adapter() (0 unless set; -1 = base only).
//
// Dispatch per projection: when one adapter serves every token, the LoRA math runs as plain GEMMs
// (ops::Matmul, cuBLASLt on CUDA) with ops::LoraDropout for the dropout mask; otherwise through
// the segmented multi-adapter kernels of ops/lora.h (adapters of different ranks, no padding).
// Both use the same dropout mask, so the choice never changes results beyond rounding.
//
// Memory: per (layer, projection) the set keeps the low-rank activations h = drop(x) A^T of the
// last forward ([N, r], or segment-packed, compute dtype), which the backward needs; the
// projection inputs x are the model's own saved activations. Nothing else is kept but, for the
// fast path below, the stacked A of each projection group.
//
// Fast path (model::AdapterHooks::ProjectionsForwardFirst): when one adapter serves every token
// and targets every member of a group (q|k|v, gate|up, o, down) with one scale, without dropout
// in the call and on one tp rank, the group runs before the base GEMM: one shrink over x with
// the members' A stacked (x read once for q, k and v), each member's expand written into its
// columns of y (the base GEMM then accumulates onto it, so y is not read back); backward the
// same: one dA GEMM over x, one dx GEMM written before the base's input-gradient GEMM. The
// values equal the per-projection path's up to rounding (bf16 y: the delta is rounded before the
// base product is added, not after).
//
// Wide path (model::AdapterHooks::ProjectionsForwardWide, on by default): where the fast path
// applies to a group and the model offers spare columns beside the group's input and
// output gradient, the set keeps per (layer, group) one matrix M = [[W, B], [A, 0]]
// ([out + R, in + R]: a copy of the frozen base weight W with the members' B block-diagonally
// beside it and their stacked A below it), writes s h = s x A^T into x's spare columns and runs
// the projection as one GEMM, y = [x | s h] M[:out]^T: no expand and no read-back of y. Backward
// writes s dy B into dy's spare columns (dh) and gets dx = [dy | dh] M[:, :in] in one GEMM: no dx
// product and no read-back of dx. dB = dy^T (s h) and dA = dh^T x as in the fast path. W's copy
// is refreshed when the model's weights_generation or W's address changes; B and A are copied in
// at every forward (they change at every step), in one launch per group. Costs the copy of W (the
// frozen projection weights once more) and R extra columns of the GEMMs' inner dimension.
//
// Dropout runs only in training calls (ForwardBackward). Its masks come from a counter-based
// generator: the seed of one projection call is a function of (dropout_seed, the batch counter,
// layer, projection), and the counter advances once per training batch. With recompute the
// repeated forward of a block regenerates the same masks. Save batch_counter() with a checkpoint
// and restore it with set_batch_counter() to resume bit for bit.
//
// Parallelism (LoraParallel, peft/lora.h): under tensor parallelism the adapters hold the slices
// of peft/lora.h and the set adds the tp reductions that make the mesh run equal the one-rank run:
// for column-parallel projections dA's partial sums are all-reduced over the tp group (and dB's
// over the ranks sharing a kv head); for row-parallel ones each rank adds B (A_local x_local) to
// its partial output before the model's all-reduce, and dB's partial sums are all-reduced. The
// reductions are all-gathers summed in tp rank order, so replicated parameters get bitwise-equal
// gradients on every tp rank. Dropout masks are indexed by the token's row in the global batch
// and the input column of the whole projection (ops::LoraDropoutAt), so dp, cp and tp runs drop
// what the one-rank run drops. The segmented multi-adapter path runs on one tp rank only, and in
// training with dropout only where this rank's rows are the global batch's (dp_rank 0, cp 1):
// other cases are Unimplemented.
//
// Ownership: owns its adapters; keeps a reference to the Context, which must outlive it. The
// model holds a non-owning pointer: detach (SetAdapter(nullptr)) before destroying the set.
// Thread-safety: one thread at a time (the model's).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "core/status.h"
#include "core/tensor.h"
#include "model/adapter.h"
#include "model/config.h"
#include "model/llama.h"
#include "ops/context.h"
#include "ops/lora.h"
#include "peft/lora.h"

namespace tandem::peft {

class AdapterSet final : public model::AdapterHooks {
 public:
  AdapterSet(ops::Context& ctx, const model::LlamaConfig& base, const LoraParallel& parallel = {});
  ~AdapterSet() override;
  AdapterSet(const AdapterSet&) = delete;
  AdapterSet& operator=(const AdapterSet&) = delete;

  // Adds an adapter for the same base architecture and tp slicing (InvalidArgument otherwise) on
  // the set's context; returns its index, the value sequences use in Batch::adapter_ids.
  StatusOr<int> Add(std::unique_ptr<LoraAdapter> adapter);
  int size() const { return static_cast<int>(adapters_.size()); }
  LoraAdapter& adapter(int index) { return *adapters_[index]; }
  const LoraAdapter& adapter(int index) const { return *adapters_[index]; }

  // The adapter of every sequence of a batch without adapter_ids (-1: base only).
  void set_default_adapter(int index) { default_adapter_ = index; }
  int default_adapter() const { return default_adapter_; }

  // Every adapter's parameters, in adapter order: handles that share the adapters' tensors, so
  // an optimizer stepping them updates the adapters (their `trainable` flags are copies).
  std::vector<model::Parameter> parameters() const;

  // The projection-group fast path (below; on by default). Off: every projection through
  // ProjectionForward/ProjectionBackward after the base GEMM (tests compare the two).
  void set_group_fast_path(bool on) { group_fast_path_ = on; }

  // Overlap (CUDA only, off by default): the fast path's weight gradients (dB, dA: read dy, x and
  // h, feed nothing but the optimizer) go to a side stream of their own and run beside the base
  // model's backward; the model's stream waits for them at the next group's backward call and at
  // EndBackward. The caller promises that the model keeps every layer's inputs x until its
  // backward ends (no ModelOptions::recompute, which rewrites one shared block buffer per layer).
  // Same values as without (the same GEMMs in the same order on their own stream).
  void set_overlap_weight_grads(bool on) { overlap_weight_grads_ = on; }

  // The wide path (above; on by default, needs the group fast path). Off: the fast path as before.
  void set_wide_path(bool on) { wide_path_ = on; }
  // How many times a wide matrix took a fresh copy of its base weight (tests: once per group until
  // the model's weights change).
  int64_t wide_refreshes() const { return wide_refreshes_; }

  void set_dropout_seed(uint64_t seed) { dropout_seed_ = seed; }
  uint64_t batch_counter() const { return batch_counter_; }
  void set_batch_counter(uint64_t counter) { batch_counter_ = counter; }

  // model::AdapterHooks.
  Status BeginBatch(const model::Batch& batch, bool training) override;
  Status ProjectionForward(int64_t layer, model::Projection proj, const Tensor& x,
                           Tensor& y) override;
  Status ProjectionBackward(int64_t layer, model::Projection proj, const Tensor& x,
                            const Tensor& dy, Tensor& dx) override;
  StatusOr<bool> ProjectionsForwardFirst(int64_t layer, std::span<const model::Projection> projs,
                                         std::span<const int64_t> col_start, const Tensor& x,
                                         Tensor& y) override;
  StatusOr<bool> ProjectionsBackwardFirst(int64_t layer, std::span<const model::Projection> projs,
                                          std::span<const int64_t> col_start, const Tensor& x,
                                          const Tensor& dy, Tensor& dx) override;
  int64_t WideColumns(std::span<const model::Projection> projs) const override;
  StatusOr<bool> ProjectionsForwardWide(int64_t layer, std::span<const model::Projection> projs,
                                        std::span<const int64_t> col_start, const Tensor& x_wide,
                                        int64_t in, const Tensor& w, uint64_t weights_generation,
                                        Tensor& y) override;
  StatusOr<bool> ProjectionsBackwardWide(int64_t layer, std::span<const model::Projection> projs,
                                         std::span<const int64_t> col_start, const Tensor& x_wide,
                                         int64_t in, const Tensor& dy_wide, const Tensor& w,
                                         uint64_t weights_generation, Tensor& dx) override;
  Status EndBackward() override;
  Status ZeroGrads() override;
  bool SupportsTensorParallel() const override { return true; }

 private:
  // What one projection call works with.
  struct Call;
  // Cached per (layer, projection): the adapters' weight tables, built on first use.
  struct Tables {
    bool built = false;
    std::vector<int32_t> ranks;    // per adapter (0: not adapted here)
    ops::LoraWeights train, eval;  // dropout p, and p = 0
    ops::LoraWeights grads;        // f32; undefined entries for frozen adapters
  };

  // The fast path of a projection group (ProjectionsForwardFirst): one adapter serves every
  // token and targets every member with one scale, no dropout, tp 1.
  struct Group;

  // The wide path's matrix of one group (by its first member's index).
  struct WideWeights {
    Tensor m;  // [out + R, in + R]: [[W, B], [A, 0]]
    int64_t out = 0, in = 0;
    std::vector<int64_t> rank_start;  // the members' columns of B (its zero blocks follow them)
    const void* w_data = nullptr;     // the base weight copied in, and the model's generation then
    uint64_t generation = 0;
    bool has_w = false;
  };

  StatusOr<Call> PrepareCall(int64_t layer, model::Projection proj);
  // wide_[first] holds the current W (copied when stale), B and A.
  Status RefreshWide(int64_t first, const Group& g, std::span<const int64_t> col_start,
                     const Tensor& w, uint64_t generation);
  // The fast and wide paths' weight gradients: dB_m += b_alpha dy_m^T h_m, dA_m += dh_m^T x (on
  // the side stream when overlapping; keep_dh: dh is a temporary the side work must keep alive).
  Status GroupWeightGrads(const Group& g, std::span<const int64_t> col_start, const Tensor& x,
                          const Tensor& dy, const Tensor& h, float b_alpha, const Tensor& dh,
                          bool keep_dh);
  // The model's stream waits for the side stream's queued work (overlap).
  Status JoinSide();
  // The group's calls, or nullopt when the fast path does not apply.
  StatusOr<std::optional<Group>> PrepareGroup(int64_t layer,
                                              std::span<const model::Projection> projs);
  Status BuildTables(int64_t layer, model::Projection proj, Tables& t);
  StatusOr<const ops::LoraSegments*> SegmentsFor(const std::vector<int32_t>& ranks);
  uint64_t CallSeed(int64_t layer, model::Projection proj) const;
  Status SingleForward(const Call& c, const Tensor& x, Tensor& y);
  Status SingleBackward(const Call& c, const Tensor& x, const Tensor& dy, Tensor& dx);
  // y = drop(x) (or y += drop(x)) with the mask of the global rows and of input columns from
  // col_offset on.
  Status Dropout(const Call& c, Tensor& y, const Tensor& x, float p, int64_t col_offset,
                 bool accumulate);
  // grad += partial: the f32 [rows, cols] weight-gradient scratch sum_scratch_ after summing it
  // over groups of `share` consecutive tp ranks (this rank's group), in tp rank order.
  Status AddTpSum(Tensor& grad, int64_t rows, int64_t cols, int share);
  // The global batch row of each local token (row_ids_), when it is not the local row.
  Status BuildRowIds(int64_t B, int64_t T);

  ops::Context& ctx_;
  model::LlamaConfig base_;
  LoraParallel parallel_;
  std::vector<std::unique_ptr<LoraAdapter>> adapters_;
  int default_adapter_ = 0;
  uint64_t dropout_seed_;
  uint64_t batch_counter_ = 0;

  // The current batch.
  bool training_ = false;
  uint64_t batch_seed_ = 0;  // dropout key of the current training batch
  int64_t num_tokens_ = 0;
  std::vector<bool> trainable_signature_;  // every adapter parameter's trainable flag
  std::vector<int32_t> seg_start_, seg_adapter_;
  std::map<std::vector<int32_t>, ops::LoraSegments> segments_;  // by rank table, this batch
  std::vector<Tables> tables_;                                  // [L * 7]
  std::vector<Tensor> h_;                                       // [L * 7]: h of the last forward
  // Per group, by its first member's index [L * 7]: the members' A stacked ([sum r, in]), and
  // whether this batch's forward took the fast path (h_ then holds the group's [N, sum r]).
  std::vector<Tensor> group_a_;
  std::vector<bool> group_fused_;
  bool group_fast_path_ = true;
  // The wide path: per group (first member's index) its matrix and whether this batch's forward
  // took it.
  bool wide_path_ = true;
  std::vector<WideWeights> wide_;
  std::vector<bool> group_wide_;
  int64_t wide_refreshes_ = 0;
  // Overlap: the side stream, whether work is queued on it that the model's stream has not
  // waited for, and the tensors that work reads which would otherwise go back to the allocator.
  bool overlap_weight_grads_ = false;
  std::unique_ptr<ops::Context> side_ctx_;
  bool side_pending_ = false;
  std::vector<Tensor> side_keep_;
  Tensor group_grad_scratch_;  // f32 [sum r, in]: the group's dA before it is split
  Tensor row_ids_;      // i64 [N] on the device: global batch rows (undefined: the local rows)
  Tensor sum_scratch_;  // f32: a weight-gradient partial sum (tp)
  Tensor sum_gather_;   // f32 [tp * n]: every tp rank's partial sum
};

}  // namespace tandem::peft
