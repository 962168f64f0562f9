// MeshModelHooks: model::ParallelHooks over the tp and cp communicators of a mesh, so that
// LlamaModel runs tensor- and context-parallel without depending on collectives/.
//
//   parallel::MeshModelHooks hooks(*ctx, groups.tp.get(), groups.cp.get());
//   model::ModelOptions opt;
//   opt.parallel = {groups.coords.tp, shape.tp, groups.coords.cp, shape.cp, &hooks};
//
// Tensors on a device other than the communicator's are staged (host <-> device copies, blocking):
// correct everywhere, fast where they already match (host communicators with a CPU context, NCCL
// on the context's stream).
//
// Context-parallel attention: CpAttention::kRing (default) is ring attention
// (parallel/ring_attention.h); kGather all-gathers q, k, v (and dout) over cp and runs the plain
// attention op on the whole sequence: exact, not memory-efficient, host only (a cross-check).
//
// Ownership: the context and communicators are not owned and must outlive the hooks.
// Thread-safety: the thread that runs the model.
#pragma once

#include "collectives/communicator.h"
#include "model/llama.h"
#include "ops/context.h"

namespace tandem::parallel {

enum class CpAttention { kRing, kGather };

class MeshModelHooks : public model::ParallelHooks {
 public:
  // tp / cp may be null when that size is 1.
  MeshModelHooks(ops::Context& ctx, collectives::Communicator* tp, collectives::Communicator* cp,
                 CpAttention cp_attention = CpAttention::kRing)
      : ctx_(ctx), tp_(tp), cp_(cp), cp_attention_(cp_attention) {}

  Status TpAllReduceSum(Tensor& inout) override;
  Status TpAllReduceMax(Tensor& inout) override;
  Status TpAllGather(Tensor& out, const Tensor& in) override;
  Status CpAttentionForward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                            const Tensor& v, float scale) override;
  Status CpAttentionBackward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout,
                             const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                             const Tensor& lse, float scale) override;

 private:
  ops::Context& ctx_;
  collectives::Communicator* tp_;
  collectives::Communicator* cp_;
  CpAttention cp_attention_;

  Status GatherForward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                       float scale);
  Status GatherBackward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q,
                        const Tensor& k, const Tensor& v, float scale);
};

// All-reduce of `inout` (any device) over `comm`, staged through the communicator's device.
Status AllReduceAnywhere(ops::Context& ctx, collectives::Communicator& comm, Tensor& inout,
                         collectives::ReduceOp op);
// All-gather of `in` [n] into `out` [size * n] (same device as `in`), staged likewise.
Status AllGatherAnywhere(ops::Context& ctx, collectives::Communicator& comm, Tensor& out,
                         const Tensor& in);

}  // namespace tandem::parallel
