#include "parallel/model_hooks.h"

#include <algorithm>

#include "ops/ops.h"
#include "parallel/ring_attention.h"

namespace tandem::parallel {

using collectives::Communicator;
using collectives::ReduceOp;

namespace {

// Streams are ordered when the communicator runs on the context's stream (or both are host).
bool SameOrder(ops::Context& ctx, Communicator& comm) {
  return comm.device() == ctx.device() && comm.stream() == ctx.stream();
}

// A copy of `t` on `device` (blocking).
StatusOr<Tensor> OnDevice(ops::Context& ctx, const Tensor& t, Device device, Communicator& comm) {
  if (device.is_cpu()) {
    TANDEM_RETURN_IF_ERROR(ctx.Synchronize());
    return CopyToHostBlocking(t);
  }
  TANDEM_CHECK_MSG(device == ctx.device(), "communicator on ", DeviceName(device), ", context on ",
                   DeviceName(ctx.device()));
  return CopyToDeviceBlocking(t, ctx.allocator());
}

}  // namespace

Status AllReduceAnywhere(ops::Context& ctx, Communicator& comm, Tensor& inout, ReduceOp op) {
  if (inout.device() == comm.device()) {
    if (!SameOrder(ctx, comm)) TANDEM_RETURN_IF_ERROR(ctx.Synchronize());
    TANDEM_RETURN_IF_ERROR(comm.AllReduce(inout, op));
    return SameOrder(ctx, comm) ? Status::Ok() : comm.Synchronize();
  }
  TANDEM_ASSIGN_OR_RETURN(Tensor staged, OnDevice(ctx, inout, comm.device(), comm));
  TANDEM_RETURN_IF_ERROR(comm.AllReduce(staged, op));
  TANDEM_RETURN_IF_ERROR(comm.Synchronize());
  TANDEM_RETURN_IF_ERROR(CopyTensor(inout, staged, ctx.stream()));
  return ctx.Synchronize();
}

Status AllGatherAnywhere(ops::Context& ctx, Communicator& comm, Tensor& out, const Tensor& in) {
  if (in.device() == comm.device() && out.device() == comm.device()) {
    if (!SameOrder(ctx, comm)) TANDEM_RETURN_IF_ERROR(ctx.Synchronize());
    TANDEM_RETURN_IF_ERROR(comm.AllGather(out, in));
    return SameOrder(ctx, comm) ? Status::Ok() : comm.Synchronize();
  }
  TANDEM_ASSIGN_OR_RETURN(Tensor sin, OnDevice(ctx, in, comm.device(), comm));
  TANDEM_ASSIGN_OR_RETURN(Tensor sout, OnDevice(ctx, out, comm.device(), comm));
  TANDEM_RETURN_IF_ERROR(comm.AllGather(sout, sin));
  TANDEM_RETURN_IF_ERROR(comm.Synchronize());
  TANDEM_RETURN_IF_ERROR(CopyTensor(out, sout, ctx.stream()));
  return ctx.Synchronize();
}

Status MeshModelHooks::TpAllReduceSum(Tensor& inout) {
  TANDEM_CHECK_MSG(tp_ != nullptr, "tp hooks without a tp communicator");
  return AllReduceAnywhere(ctx_, *tp_, inout, ReduceOp::kSum);
}

Status MeshModelHooks::TpAllReduceMax(Tensor& inout) {
  TANDEM_CHECK_MSG(tp_ != nullptr, "tp hooks without a tp communicator");
  return AllReduceAnywhere(ctx_, *tp_, inout, ReduceOp::kMax);
}

Status MeshModelHooks::TpAllGather(Tensor& out, const Tensor& in) {
  TANDEM_CHECK_MSG(tp_ != nullptr, "tp hooks without a tp communicator");
  return AllGatherAnywhere(ctx_, *tp_, out, in);
}

Status MeshModelHooks::CpAttentionForward(Tensor& out, Tensor& lse, const Tensor& q,
                                          const Tensor& k, const Tensor& v, float scale) {
  TANDEM_CHECK_MSG(cp_ != nullptr, "cp hooks without a cp communicator");
  if (cp_attention_ == CpAttention::kGather) return GatherForward(out, lse, q, k, v, scale);
  return RingAttentionForward(ctx_, *cp_, out, lse, q, k, v, scale);
}

Status MeshModelHooks::CpAttentionBackward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout,
                                           const Tensor& q, const Tensor& k, const Tensor& v,
                                           const Tensor& out, const Tensor& lse, float scale) {
  TANDEM_CHECK_MSG(cp_ != nullptr, "cp hooks without a cp communicator");
  if (cp_attention_ == CpAttention::kGather) {
    return GatherBackward(dq, dk, dv, dout, q, k, v, scale);
  }
  return RingAttentionBackward(ctx_, *cp_, dq, dk, dv, dout, q, k, v, out, lse, scale);
}

}  // namespace tandem::parallel
